//! OpenAI's Responses API (`POST /v1/responses`) on a chat model, text in
//! and text out: `input` (a string, or messages whose content is a string
//! or `input_text`/`output_text` parts) and `instructions` become the chat
//! the model's template renders; the answer is one `message` output item,
//! or, streamed, the API's event sequence (`response.created` … deltas …
//! `response.completed`).
//!
//! Nothing is stored: `previous_response_id` is refused (send the whole
//! conversation), and `store` is answered `false`. Tools are refused
//! rather than ignored.

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::chat::{GenerationEvent, Message, MessageContent};
use crate::reply;
use crate::server::Shared;
use crate::EngineError;

/// `input`: a user's text, or the conversation so far.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Input {
    Text(String),
    Items(Vec<InputItem>),
}

/// A message of `input` (`type` is `message` or left out).
#[derive(Debug, Deserialize)]
pub(crate) struct InputItem {
    #[serde(rename = "type")]
    kind: Option<String>,
    role: String,
    content: MessageContent,
}

/// `text.format`: as chat's `response_format`, its fields flat.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum TextFormat {
    Text,
    JsonObject,
    JsonSchema { schema: Option<Value> },
}

#[derive(Debug, Deserialize)]
pub(crate) struct TextOptions {
    pub format: Option<TextFormat>,
}

/// The fields of a Responses request beside the sampling ones chat shares.
#[derive(Debug, Deserialize)]
pub(crate) struct ResponsesFields {
    pub input: Input,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u64>,
    pub text: Option<TextOptions>,
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub tools: Vec<Value>,
}

impl ResponsesFields {
    /// The chat the model reads: the instructions as a system turn, then
    /// the input.
    pub(crate) fn messages(&self) -> Result<Vec<Message>, EngineError> {
        if self.previous_response_id.is_some() {
            return Err(EngineError::BadRequest(
                "previous_response_id: responses are not stored here; send the whole \
                 conversation in input"
                    .into(),
            ));
        }
        if !self.tools.is_empty() {
            return Err(EngineError::BadRequest(
                "tools: this engine does not call tools; send none".into(),
            ));
        }
        let mut out = Vec::new();
        if let Some(i) = &self.instructions {
            out.push(Message {
                role: "system".into(),
                content: MessageContent::Text(i.clone()),
            });
        }
        match &self.input {
            Input::Text(t) => out.push(Message {
                role: "user".into(),
                content: MessageContent::Text(t.clone()),
            }),
            Input::Items(items) => {
                for (i, item) in items.iter().enumerate() {
                    if item.kind.as_deref().is_some_and(|k| k != "message") {
                        return Err(EngineError::BadRequest(format!(
                            "input[{i}].type {:?} is not supported; send messages",
                            item.kind.as_deref().unwrap_or("")
                        )));
                    }
                    out.push(Message {
                        role: item.role.clone(),
                        content: item.content.clone(),
                    });
                }
            }
        }
        Ok(out)
    }
}

fn hex_id(prefix: &str) -> String {
    format!("{prefix}_{:032x}", rand::random::<u128>())
}

/// A response as it stands, and the numbering of its stream's events.
struct Answer {
    id: String,
    item: String,
    created_at: u64,
    echo: Value,
    text: String,
    sequence: u64,
}

impl Answer {
    fn part(&self) -> Value {
        json!({"type": "output_text", "text": self.text, "annotations": []})
    }

    fn item(&self, done: bool) -> Value {
        let content = if done { vec![self.part()] } else { Vec::new() };
        json!({"type": "message", "id": self.item, "role": "assistant",
               "status": if done { "completed" } else { "in_progress" }, "content": content})
    }

    /// The response object; `end` is how generation ended, if it has.
    fn response(&self, end: Option<(&str, usize, usize)>) -> Value {
        let mut r = self.echo.clone();
        r["id"] = json!(self.id);
        r["object"] = json!("response");
        r["created_at"] = json!(self.created_at);
        r["error"] = Value::Null;
        match end {
            None => {
                r["status"] = json!("in_progress");
                r["output"] = json!([]);
                r["usage"] = Value::Null;
                r["incomplete_details"] = Value::Null;
            }
            Some((finish, input, output)) => {
                let cut = finish == "length";
                r["status"] = json!(if cut { "incomplete" } else { "completed" });
                r["incomplete_details"] = if cut {
                    json!({"reason": "max_output_tokens"})
                } else {
                    Value::Null
                };
                r["output"] = json!([self.item(true)]);
                r["usage"] = json!({"input_tokens": input, "output_tokens": output,
                    "total_tokens": input + output,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0}});
            }
        }
        r
    }

    /// One server-sent event of the stream.
    fn event(&mut self, kind: &str, mut body: Value) -> Vec<u8> {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        format!("event: {kind}\ndata: {body}\n\n").into_bytes()
    }

    fn text_at(&self) -> Value {
        json!({"item_id": self.item, "output_index": 0, "content_index": 0})
    }
}

/// What a request said of itself that its response repeats.
pub(crate) fn echo(
    model: &str,
    fields: &ResponsesFields,
    temperature: f64,
    top_p: Option<f64>,
) -> Value {
    let format = match fields.text.as_ref().and_then(|t| t.format.as_ref()) {
        Some(TextFormat::JsonObject) => json!({"type": "json_object"}),
        Some(TextFormat::JsonSchema { .. }) => json!({"type": "json_schema"}),
        _ => json!({"type": "text"}),
    };
    json!({"model": model, "instructions": fields.instructions,
           "max_output_tokens": fields.max_output_tokens, "temperature": temperature,
           "top_p": top_p.unwrap_or(1.0), "parallel_tool_calls": false, "tool_choice": "none",
           "tools": [], "store": false, "text": {"format": format}, "metadata": {}})
}

/// Answers a Responses request with the generation behind `rx`.
pub(crate) async fn respond(
    engine: Shared,
    mut rx: mpsc::Receiver<(usize, GenerationEvent)>,
    echo: Value,
    stream: bool,
) -> Response {
    engine.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let mut answer = Answer {
        id: hex_id("resp"),
        item: hex_id("msg"),
        created_at: reply::now_secs(),
        echo,
        text: String::new(),
        sequence: 0,
    };
    if !stream {
        while let Some((_, event)) = rx.recv().await {
            match event {
                GenerationEvent::Delta(t) => answer.text.push_str(&t),
                GenerationEvent::Logprobs(_) => {}
                GenerationEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let end = (finish_reason, prompt_tokens, completion_tokens);
                    return Json(answer.response(Some(end))).into_response();
                }
                GenerationEvent::Failed(m) => return EngineError::Internal(m).into_response(),
            }
        }
        return EngineError::Internal("generation ended without a result".into()).into_response();
    }
    let (tx, response) = reply::event_stream();
    tokio::spawn(async move {
        let mut start = Vec::new();
        let pending = json!({"response": answer.response(None)});
        start.extend(answer.event("response.created", pending.clone()));
        start.extend(answer.event("response.in_progress", pending));
        let item = json!({"output_index": 0, "item": answer.item(false)});
        start.extend(answer.event("response.output_item.added", item));
        let mut part = answer.text_at();
        part["part"] = answer.part();
        start.extend(answer.event("response.content_part.added", part));
        if tx.send(Ok(Bytes::from(start))).await.is_err() {
            return;
        }
        while let Some((_, event)) = rx.recv().await {
            let out = match event {
                GenerationEvent::Logprobs(_) => continue,
                GenerationEvent::Delta(delta) => {
                    answer.text.push_str(&delta);
                    let mut body = answer.text_at();
                    body["delta"] = json!(delta);
                    body["logprobs"] = json!([]);
                    answer.event("response.output_text.delta", body)
                }
                GenerationEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let mut out = Vec::new();
                    let mut done = answer.text_at();
                    done["text"] = json!(answer.text);
                    out.extend(answer.event("response.output_text.done", done));
                    let mut part = answer.text_at();
                    part["part"] = answer.part();
                    out.extend(answer.event("response.content_part.done", part));
                    let item = json!({"output_index": 0, "item": answer.item(true)});
                    out.extend(answer.event("response.output_item.done", item));
                    let end = (finish_reason, prompt_tokens, completion_tokens);
                    let last = if finish_reason == "length" {
                        "response.incomplete"
                    } else {
                        "response.completed"
                    };
                    let response = json!({"response": answer.response(Some(end))});
                    out.extend(answer.event(last, response));
                    let _ = tx.send(Ok(Bytes::from(out))).await;
                    return;
                }
                GenerationEvent::Failed(message) => {
                    let err = json!({"code": "server_error", "message": message, "param": null});
                    let _ = tx.send(Ok(Bytes::from(answer.event("error", err)))).await;
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
