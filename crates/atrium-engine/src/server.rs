//! The OpenAI-compatible HTTP surface of one engine.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::chat::{GenerationEvent, Message, SamplingParams};
use crate::logprobs::{MAX_COMPLETION_LOGPROBS, MAX_TOP_LOGPROBS};
use crate::reply::{self, Asked, Shape};
use crate::responses::{self, ResponsesFields, TextFormat};
use crate::simulated::SimulatedEngine;
use crate::structured::Grammar;
use crate::{Engine, EngineError, Loaded};

pub(crate) type Shared = Arc<Engine>;

/// Largest request body the engine reads.
const BODY_LIMIT: usize = 4 << 20;
/// Completion length when the request sets none.
const DEFAULT_MAX_TOKENS: usize = 512;

pub fn router(engine: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            error_response(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "no such route".into(),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(access_log))
        .with_state(engine)
}

/// One line per request that carries a gateway's `x-request-id`, in the
/// replica's own log: where a request was really served can be checked
/// there, not only in what the gateways say.
async fn access_log(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    if let Some(id) = id {
        tracing::info!(request_id = %id, %path, status = response.status().as_u16(), "served");
    }
    response
}

fn error_response(status: StatusCode, kind: &str, message: String) -> Response {
    let code = match status {
        StatusCode::NOT_FOUND => Value::from("model_not_found"),
        StatusCode::TOO_MANY_REQUESTS => Value::from("rate_limit_exceeded"),
        _ => Value::Null,
    };
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": null, "code": code}})),
    )
        .into_response()
}

impl IntoResponse for EngineError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            EngineError::BadRequest(_) | EngineError::WrongKind(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            EngineError::ModelNotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error"),
            EngineError::Busy(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            EngineError::Load(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
            EngineError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        let mut response = error_response(status, kind, self.to_string());
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// Parses a JSON body, answering OpenAI-style errors that name the field.
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, EngineError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        EngineError::BadRequest(format!(
            "invalid request body at {path}: {}",
            e.into_inner()
        ))
    })
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Sampling fields shared by chat and completions; unknown fields are
/// ignored, as OpenAI clients send many this engine does not need.
#[derive(Debug, Deserialize)]
struct Sampling {
    model: String,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    cache_salt: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    response_format: Option<ResponseFormat>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<usize>,
    #[serde(flatten)]
    sampling: Sampling,
}

/// OpenAI's `response_format`: free text, any JSON object, or JSON that
/// validates against a schema.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize)]
struct JsonSchemaFormat {
    /// The schema; without one, any JSON object.
    schema: Option<Value>,
}

impl ResponseFormat {
    fn grammar(&self) -> Result<Option<Arc<Grammar>>, EngineError> {
        match self {
            ResponseFormat::Text => Ok(None),
            ResponseFormat::JsonObject => Grammar::for_json(None).map(Some),
            ResponseFormat::JsonSchema { json_schema } => {
                Grammar::for_json(json_schema.schema.as_ref()).map(Some)
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    logprobs: Option<usize>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: EmbeddingInput,
    encoding_format: Option<String>,
}

fn check_model(engine: &Engine, model: &str) -> Result<(), EngineError> {
    if model == engine.served_name {
        Ok(())
    } else {
        Err(EngineError::ModelNotFound(model.to_string()))
    }
}

fn sampling_params(s: &Sampling, default_max: usize) -> Result<SamplingParams, EngineError> {
    if s.n.is_some_and(|n| n == 0 || n > MAX_CHOICES) {
        return Err(EngineError::BadRequest(format!(
            "n must be 1 to {MAX_CHOICES}"
        )));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(EngineError::BadRequest(format!(
            "temperature {temperature} is outside 0..2"
        )));
    }
    if let Some(p) = s.top_p {
        if !(0.0..=1.0).contains(&p) || p == 0.0 {
            return Err(EngineError::BadRequest(format!(
                "top_p {p} is outside (0, 1]"
            )));
        }
    }
    let max_tokens = s
        .max_completion_tokens
        .or(s.max_tokens)
        .map(|m| m as usize)
        .unwrap_or(default_max);
    if max_tokens == 0 {
        return Err(EngineError::BadRequest(
            "max_tokens must be at least 1".into(),
        ));
    }
    let stop = match &s.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(EngineError::BadRequest(
            "stop takes up to 4 non-empty strings".into(),
        ));
    }
    let penalty = |name: &str, v: Option<f64>| match v {
        Some(p) if !(-2.0..=2.0).contains(&p) => Err(EngineError::BadRequest(format!(
            "{name} {p} is outside -2..2"
        ))),
        v => Ok(v.unwrap_or(0.0) as f32),
    };
    let presence_penalty = penalty("presence_penalty", s.presence_penalty)?;
    let frequency_penalty = penalty("frequency_penalty", s.frequency_penalty)?;
    if s.cache_salt.as_ref().is_some_and(|salt| salt.len() > 256) {
        return Err(EngineError::BadRequest(
            "cache_salt is longer than 256 bytes".into(),
        ));
    }
    Ok(SamplingParams {
        cache_salt: s.cache_salt.clone(),
        temperature,
        top_p: s.top_p,
        seed: s.seed.unwrap_or_else(rand::random),
        max_tokens,
        stop,
        presence_penalty,
        frequency_penalty,
        grammar: None,
        logprobs: None,
    })
}

/// The most choices one request may ask for (`n`).
const MAX_CHOICES: u32 = 16;

/// Starts a request's `n` generations of a rendered prompt on whichever
/// engine is loaded, choice `i` sampling with the seed plus `i` (so the
/// first is what the request alone would give), their events merged.
fn start(
    engine: &Engine,
    prompt: &str,
    params: SamplingParams,
    n: usize,
) -> Result<mpsc::Receiver<(usize, GenerationEvent)>, EngineError> {
    let tokens = match &engine.loaded {
        Loaded::Chat(m) => Some(m.encode(prompt)?),
        _ => None,
    };
    let mut receivers = Vec::with_capacity(n);
    for i in 0..n {
        let params = SamplingParams {
            seed: params.seed.wrapping_add(i as u64),
            ..params.clone()
        };
        receivers.push(match (&engine.loaded, &tokens) {
            (Loaded::Chat(m), Some(tokens)) => m.generate(tokens.clone(), params)?,
            (Loaded::Simulated(s), _) => {
                s.generate(SimulatedEngine::count_tokens(prompt), params.max_tokens)?
            }
            _ => {
                return Err(EngineError::WrongKind(
                    "this engine serves an embedding model; use /v1/embeddings".into(),
                ))
            }
        });
    }
    Ok(reply::merge(receivers))
}

/// How many choices the request asked for (checked by `sampling_params`).
fn choices(s: &Sampling) -> usize {
    s.n.unwrap_or(1) as usize
}

/// What the request asked of its answer's form.
fn asked(s: &Sampling, logprobs: bool) -> Asked {
    Asked {
        model: s.model.clone(),
        stream: s.stream,
        include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs,
    }
}

async fn chat_completions(State(engine): State<Shared>, body: Bytes) -> Response {
    let result = async {
        let req: ChatRequest = parse(&body)?;
        check_model(&engine, &req.sampling.model)?;
        let prompt = match &engine.loaded {
            Loaded::Chat(m) => m.render_chat(&req.messages)?,
            Loaded::Simulated(_) => {
                let mut text = String::new();
                for m in &req.messages {
                    text.push_str(&m.content.text()?);
                }
                text
            }
            Loaded::Embedding(_) => {
                return Err(EngineError::WrongKind(
                    "this engine serves an embedding model; use /v1/embeddings".into(),
                ))
            }
        };
        let mut params = sampling_params(&req.sampling, DEFAULT_MAX_TOKENS)?;
        params.logprobs = match (req.logprobs, req.top_logprobs) {
            (_, Some(n)) if n > MAX_TOP_LOGPROBS => {
                return Err(EngineError::BadRequest(format!(
                    "top_logprobs {n} is more than {MAX_TOP_LOGPROBS}"
                )))
            }
            (false, Some(_)) => {
                return Err(EngineError::BadRequest(
                    "top_logprobs needs logprobs: true".into(),
                ))
            }
            (true, n) => Some(n.unwrap_or(0)),
            (false, None) => None,
        };
        if let Some(format) = &req.response_format {
            params.grammar = format.grammar()?;
            if params.grammar.is_some() && !matches!(engine.loaded, Loaded::Chat(_)) {
                return Err(EngineError::BadRequest(
                    "response_format: this engine writes no model's text, so it cannot keep \
                     to a format; send type \"text\""
                        .into(),
                ));
            }
        }
        let logprobs = params.logprobs.is_some();
        let n = choices(&req.sampling);
        let rx = start(&engine, &prompt, params, n)?;
        Ok((rx, n, asked(&req.sampling, logprobs)))
    }
    .await;
    match result {
        Ok((rx, n, asked)) => reply::respond(engine, rx, n, Shape::Chat, asked).await,
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/responses`: the Responses API on a chat model (`responses`).
#[derive(Debug, Deserialize)]
struct ResponsesRequest {
    #[serde(flatten)]
    fields: ResponsesFields,
    #[serde(flatten)]
    sampling: Sampling,
}

async fn responses(State(engine): State<Shared>, body: Bytes) -> Response {
    let result = async {
        let mut req: ResponsesRequest = parse(&body)?;
        check_model(&engine, &req.sampling.model)?;
        let Loaded::Chat(m) = &engine.loaded else {
            return Err(EngineError::WrongKind(
                "the Responses API is served by chat models".into(),
            ));
        };
        let prompt = m.render_chat(&req.fields.messages()?)?;
        req.sampling.max_tokens = req.fields.max_output_tokens;
        let mut params = sampling_params(&req.sampling, DEFAULT_MAX_TOKENS)?;
        params.grammar = match req.fields.text.as_ref().and_then(|t| t.format.as_ref()) {
            None | Some(TextFormat::Text) => None,
            Some(TextFormat::JsonObject) => Some(Grammar::for_json(None)?),
            Some(TextFormat::JsonSchema { schema }) => Some(Grammar::for_json(schema.as_ref())?),
        };
        let echo = responses::echo(
            &req.sampling.model,
            &req.fields,
            params.temperature,
            params.top_p,
        );
        let rx = start(&engine, &prompt, params, 1)?;
        Ok((rx, echo, req.sampling.stream))
    }
    .await;
    match result {
        Ok((rx, echo, stream)) => responses::respond(engine, rx, echo, stream).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(engine): State<Shared>, body: Bytes) -> Response {
    let result = async {
        let req: CompletionRequest = parse(&body)?;
        check_model(&engine, &req.sampling.model)?;
        let prompt = match req.prompt {
            Prompt::One(p) => p,
            Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
            Prompt::Many(_) => {
                return Err(EngineError::BadRequest(
                    "prompt: send one prompt per request".into(),
                ))
            }
        };
        let mut params = sampling_params(&req.sampling, 16)?;
        if let Some(n) = req.logprobs.filter(|n| *n > MAX_COMPLETION_LOGPROBS) {
            return Err(EngineError::BadRequest(format!(
                "logprobs {n} is more than {MAX_COMPLETION_LOGPROBS}"
            )));
        }
        params.logprobs = req.logprobs;
        let n = choices(&req.sampling);
        let rx = start(&engine, &prompt, params, n)?;
        Ok((rx, n, asked(&req.sampling, req.logprobs.is_some())))
    }
    .await;
    match result {
        Ok((rx, n, asked)) => reply::respond(engine, rx, n, Shape::Completion, asked).await,
        Err(e) => e.into_response(),
    }
}

async fn embeddings(State(engine): State<Shared>, body: Bytes) -> Response {
    let result = async {
        let req: EmbeddingRequest = parse(&body)?;
        check_model(&engine, &req.model)?;
        if !matches!(engine.loaded, Loaded::Embedding(_)) {
            return Err(EngineError::WrongKind("this engine serves a generative model; use /v1/chat/completions".into()));
        }
        let inputs = match req.input {
            EmbeddingInput::One(s) => vec![s],
            EmbeddingInput::Many(v) => v,
        };
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => return Err(EngineError::BadRequest(format!("encoding_format {other:?} must be float or base64"))),
        };
        engine.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let engine2 = engine.clone();
        let embedded = tokio::task::spawn_blocking(move || match &engine2.loaded {
            Loaded::Embedding(m) => m.embed(&inputs),
            _ => Err(EngineError::Internal("engine kind changed".into())),
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))??;
        let data: Vec<Value> = embedded
            .vectors
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                    Value::from(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        Ok(json!({"object": "list", "data": data, "model": req.model,
                  "usage": {"prompt_tokens": embedded.prompt_tokens, "total_tokens": embedded.prompt_tokens}}))
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(engine): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": engine.served_name, "object": "model", "created": engine.created, "owned_by": "atrium"}
    ]}))
}

/// `GET /v1/models/{id}`, as the OpenAI SDK's `models.retrieve` asks.
async fn model(State(engine): State<Shared>, Path(id): Path<String>) -> Response {
    if id != engine.served_name {
        return EngineError::ModelNotFound(id).into_response();
    }
    Json(json!({"id": engine.served_name, "object": "model", "created": engine.created, "owned_by": "atrium"}))
        .into_response()
}

async fn metrics(State(engine): State<Shared>) -> Response {
    let depth = match &engine.loaded {
        Loaded::Chat(m) => m.queue_depth(),
        Loaded::Simulated(s) => s.queue_depth(),
        Loaded::Embedding(_) => engine.metrics.running.load(Ordering::Relaxed),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        engine.metrics.render(depth),
    )
        .into_response()
}
