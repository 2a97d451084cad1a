//! Generation events turned into OpenAI's chat and completions answers:
//! one JSON body, or a stream of server-sent chunks. A request for `n`
//! choices runs `n` generations; their events arrive merged, each with
//! its choice's index, and the answer ends when every choice has.

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::chat::GenerationEvent;
use crate::logprobs::{self, TokenLogprob};
use crate::server::Shared;
use crate::EngineError;

/// Which response shape a generation is streamed or collected into.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Chat,
    Completion,
}

/// What the request asked of the answer's form.
pub(crate) struct Asked {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
}

/// The events of `n` generations as one stream, each with its index. A
/// generation whose reader is gone (the client left) is cancelled by the
/// batcher when its channel closes.
pub(crate) fn merge(
    receivers: Vec<mpsc::Receiver<GenerationEvent>>,
) -> mpsc::Receiver<(usize, GenerationEvent)> {
    let (tx, rx) = mpsc::channel(64);
    for (index, mut one) in receivers.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(event) = one.recv().await {
                if tx.send((index, event)).await.is_err() {
                    return;
                }
            }
        });
    }
    rx
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// One choice as it is being answered.
#[derive(Default)]
struct Choice {
    text: String,
    /// Scores not yet sent, and (completions) the bytes of text before them.
    scored: Vec<TokenLogprob>,
    offset: usize,
    finish: Option<&'static str>,
    completion_tokens: usize,
}

/// Where an answer stands.
struct Reply {
    shape: Shape,
    id: String,
    created: u64,
    asked: Asked,
    choices: Vec<Choice>,
    prompt_tokens: usize,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.shape, chunk) {
            (Shape::Chat, true) => "chat.completion.chunk",
            (Shape::Chat, false) => "chat.completion",
            (Shape::Completion, _) => "text_completion",
        }
    }

    /// The logprobs of choice `i`'s scores held, now sent with `text`.
    fn take_logprobs(&mut self, i: usize, text: &str) -> Value {
        let (shape, asked) = (self.shape, self.asked.logprobs);
        let Some(c) = self.choices.get_mut(i).filter(|_| asked) else {
            return Value::Null;
        };
        let scored = std::mem::take(&mut c.scored);
        let v = match shape {
            Shape::Chat => logprobs::chat_json(&scored),
            Shape::Completion => logprobs::completion_json(&scored, c.offset),
        };
        c.offset += text.len();
        v
    }

    /// A streamed chunk of choice `i`: text, a finish, or (chat) its role.
    fn chunk(&mut self, i: usize, text: Option<&str>, finish: Option<&str>, role: bool) -> Value {
        let logprobs = if role {
            Value::Null
        } else {
            self.take_logprobs(i, text.unwrap_or(""))
        };
        let choice = match self.shape {
            Shape::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Shape::Completion => json!({"index": i, "text": text.unwrap_or(""),
                                        "logprobs": logprobs, "finish_reason": finish}),
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.asked.model, "choices": [choice]})
    }

    fn usage(&self) -> Value {
        usage(
            self.prompt_tokens,
            self.choices.iter().map(|c| c.completion_tokens).sum(),
        )
    }

    fn done(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    /// The whole answer, once every choice is done.
    fn body(&mut self) -> Value {
        let mut choices = Vec::new();
        for i in 0..self.choices.len() {
            let text = std::mem::take(&mut self.choices[i].text);
            let logprobs = self.take_logprobs(i, &text);
            let finish = self.choices[i].finish;
            choices.push(match self.shape {
                Shape::Chat => {
                    json!({"index": i, "message": {"role": "assistant", "content": text},
                                      "logprobs": logprobs, "finish_reason": finish})
                }
                Shape::Completion => {
                    json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})
                }
            });
        }
        json!({"id": self.id, "object": self.object(false), "created": self.created,
               "model": self.asked.model, "choices": choices, "usage": self.usage()})
    }
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Answers with the `n` generations behind `rx`.
pub(crate) async fn respond(
    engine: Shared,
    mut rx: mpsc::Receiver<(usize, GenerationEvent)>,
    n: usize,
    shape: Shape,
    asked: Asked,
) -> Response {
    engine.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let mut reply = Reply {
        shape,
        id: request_id(if shape == Shape::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: now_secs(),
        asked,
        choices: (0..n).map(|_| Choice::default()).collect(),
        prompt_tokens: 0,
    };
    if !reply.asked.stream {
        while let Some((i, event)) = rx.recv().await {
            match event {
                GenerationEvent::Failed(message) => {
                    return EngineError::Internal(message).into_response()
                }
                event => {
                    reply.take(i, event);
                    if reply.done() {
                        return Json(reply.body()).into_response();
                    }
                }
            }
        }
        return EngineError::Internal("generation ended without a result".into()).into_response();
    }
    let (tx, response) = event_stream();
    tokio::spawn(async move {
        if shape == Shape::Chat {
            // Each choice's role arrives first, as OpenAI sends it.
            for i in 0..n {
                let _ = tx
                    .send(Ok(sse(&reply.chunk(i, Some(""), None, true))))
                    .await;
            }
        }
        while let Some((i, event)) = rx.recv().await {
            let out = match event {
                GenerationEvent::Logprobs(scored) => {
                    if let Some(c) = reply.choices.get_mut(i) {
                        c.scored.extend(scored);
                    }
                    continue;
                }
                GenerationEvent::Delta(text) => {
                    sse(&reply.chunk(i, Some(&text), None, false)).to_vec()
                }
                GenerationEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let mut out = Vec::new();
                    // Scores of tokens whose text was never shown.
                    if reply.choices.get(i).is_some_and(|c| !c.scored.is_empty()) {
                        out.extend_from_slice(&sse(&reply.chunk(i, Some(""), None, false)));
                    }
                    out.extend_from_slice(&sse(&reply.chunk(i, None, Some(finish_reason), false)));
                    reply.finished(i, finish_reason, prompt_tokens, completion_tokens);
                    if reply.done() {
                        if reply.asked.include_usage {
                            let u = json!({"id": reply.id, "object": reply.object(true),
                                           "created": reply.created, "model": reply.asked.model,
                                           "choices": [], "usage": reply.usage()});
                            out.extend_from_slice(&sse(&u));
                        }
                        out.extend_from_slice(b"data: [DONE]\n\n");
                        let _ = tx.send(Ok(Bytes::from(out))).await;
                        return;
                    }
                    out
                }
                GenerationEvent::Failed(message) => {
                    let err = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
                    let _ = tx.send(Ok(sse(&err))).await;
                    return;
                }
            };
            if tx.send(Ok(Bytes::from(out))).await.is_err() {
                return;
            }
        }
    });
    response
}

/// A server-sent event stream: what is sent on the channel is the body.
pub(crate) fn event_stream() -> (mpsc::Sender<Result<Bytes, Infallible>>, Response) {
    let (tx, body_rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body_rx));
    let response = (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response();
    (tx, response)
}

impl Reply {
    /// Takes a collected (not streamed) event of choice `i`.
    fn take(&mut self, i: usize, event: GenerationEvent) {
        match event {
            GenerationEvent::Logprobs(scored) => {
                if let Some(c) = self.choices.get_mut(i) {
                    c.scored.extend(scored);
                }
            }
            GenerationEvent::Delta(t) => {
                if let Some(c) = self.choices.get_mut(i) {
                    c.text.push_str(&t);
                }
            }
            GenerationEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => self.finished(i, finish_reason, prompt_tokens, completion_tokens),
            GenerationEvent::Failed(_) => {}
        }
    }

    fn finished(&mut self, i: usize, finish: &'static str, prompt: usize, completion: usize) {
        // Every choice read the same prompt: it counts once.
        self.prompt_tokens = prompt;
        if let Some(c) = self.choices.get_mut(i) {
            c.finish = Some(finish);
            c.completion_tokens = completion;
        }
    }
}
