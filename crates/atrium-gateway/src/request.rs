//! The body of a proxied request, read without building it.
//!
//! Its top-level fields stay the client's own JSON text (`RawValue`s
//! borrowed from the body), and only what the gateway needs is decoded
//! from them: the `model`, whether it streams, the completion limits and
//! the prompt's text, in one pass that serves both the token estimate and
//! the affinity prefix. Measured warm, 450–540 ns per request against
//! 660–760 ns for building a `serde_json::Value` tree alone; cold (one
//! request at a time) the two cost about the same.
//!
//! The whole body is still checked to be JSON — one object — by the same
//! parser; a duplicated key counts as its last occurrence, as it does for
//! `serde_json`'s map and for the upstreams' JSON readers.

use std::borrow::Cow;
use std::fmt;

use serde::de::{
    Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::value::RawValue;

use crate::affinity::AFFINITY_PREFIX_BYTES;

/// What a request asks for, as its route (never its body) says: it
/// decides which field holds the prompt, whether completion tokens can
/// be produced, and so what the request is estimated and billed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`: the prompt is `messages`.
    Chat,
    /// `/v1/completions`: the prompt is `prompt`.
    Completion,
    /// `/v1/embeddings`: the input is `input`; nothing is generated.
    Embedding,
    /// `/v1/responses`: the prompt is `input` (text, or messages as chat's)
    /// after `instructions`; at most `max_output_tokens` are generated.
    Response,
}

impl Kind {
    /// The field that bounds what is generated.
    pub fn max_output_field(self) -> &'static str {
        match self {
            Kind::Response => "max_output_tokens",
            _ => "max_tokens",
        }
    }
}

/// A proxied request's body: its fields, in the client's order, as the
/// client wrote them.
#[derive(Debug)]
pub struct ProxyRequest<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
    model: Cow<'a, str>,
    kind: Kind,
    prompt: PromptText,
}

/// What the gateway reads of the prompt — the chat messages, a
/// completion's `prompt` or an embedding's `input`, whichever the route
/// reads (the engine reads that field alone) — in one pass over it.
#[derive(Debug, Default)]
struct PromptText {
    /// Bytes of text, every string where text may be (nested included).
    bytes: u64,
    /// How many chat messages (`None`: no `messages` array).
    messages: Option<u64>,
    /// The first `AFFINITY_PREFIX_BYTES` the model reads: each message's
    /// role, a newline and its text.
    prefix: Vec<u8>,
}

impl PromptText {
    fn push(&mut self, text: &str) {
        let room = AFFINITY_PREFIX_BYTES.saturating_sub(self.prefix.len());
        self.prefix
            .extend_from_slice(&text.as_bytes()[..text.len().min(room)]);
    }

    fn read(fields: &[(Cow<'_, str>, &RawValue)], kind: Kind) -> PromptText {
        let mut prompt = PromptText {
            prefix: Vec::with_capacity(AFFINITY_PREFIX_BYTES),
            ..PromptText::default()
        };
        let field = match kind {
            Kind::Chat => "messages",
            Kind::Completion => "prompt",
            Kind::Embedding | Kind::Response => "input",
        };
        if kind == Kind::Response {
            // The instructions are the first thing the model reads.
            if let Some(i) = last(fields, "instructions").and_then(as_str) {
                prompt.bytes = i.len() as u64;
                prompt.push(&i);
            }
        }
        let messages_in = matches!(kind, Kind::Chat | Kind::Response);
        let read = match last(fields, field) {
            Some(messages) if messages_in && messages.get().starts_with('[') => {
                let read = serde_json::from_str::<Vec<Message<'_>>>(messages.get());
                read.map(|list| {
                    prompt.messages = Some(list.len() as u64);
                    for m in list {
                        prompt.bytes = prompt.bytes.saturating_add(m.content.bytes);
                        prompt.push(m.role.as_deref().unwrap_or(""));
                        prompt.push("\n");
                        m.content.pieces.iter().for_each(|p| prompt.push(p));
                    }
                })
                .map_err(|_| messages)
            }
            Some(raw) => serde_json::from_str::<Content<'_>>(raw.get())
                .map(|c| {
                    prompt.bytes = prompt.bytes.saturating_add(c.bytes);
                    c.pieces.iter().for_each(|p| prompt.push(p));
                })
                .map_err(|_| raw),
            None => Ok(()),
        };
        // Not expected of JSON that parsed whole; if it happens, the
        // value's own length still bounds its text.
        if let Err(raw) = read {
            prompt.bytes = raw.get().len() as u64;
        }
        prompt
    }
}

/// Fields of a JSON object, keys decoded (borrowed unless escaped),
/// values left as text.
struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// A field's value: its last occurrence, as for `serde_json`'s map.
fn last<'a>(fields: &[(Cow<'_, str>, &'a RawValue)], key: &str) -> Option<&'a RawValue> {
    fields.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// A JSON string, borrowed from the input unless it has escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    fields.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> ProxyRequest<'a> {
    /// Reads a body the gateway proxies on a route of `kind`: a JSON
    /// object naming a `model`.
    pub fn parse(bytes: &'a [u8], kind: Kind) -> Result<Self, String> {
        let fields = match serde_json::from_slice::<Fields<'a>>(bytes) {
            Ok(Fields(fields)) => fields,
            Err(e) if e.is_data() => return Err("the body must be a JSON object".into()),
            Err(e) => return Err(format!("invalid JSON body: {e}")),
        };
        let model = match last(&fields, "model") {
            None => return Err("`model` is required: name one of your deployments".into()),
            Some(raw) => match as_str(raw) {
                Some(m) if m.is_empty() => {
                    return Err("`model` is required: name one of your deployments".into())
                }
                Some(m) => m,
                None => return Err("`model` must be a string".into()),
            },
        };
        let prompt = PromptText::read(&fields, kind);
        Ok(ProxyRequest {
            fields,
            model,
            kind,
            prompt,
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// A field's JSON text (its last occurrence).
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        last(&self.fields, key)
    }

    /// Every field, in the client's order.
    pub fn fields(&self) -> &[(Cow<'a, str>, &'a RawValue)] {
        &self.fields
    }

    /// What bounds the output: `max_completion_tokens`, else the route's
    /// own field (`max_tokens`, or a response's `max_output_tokens`).
    pub fn max_output(&self) -> Option<u64> {
        self.get("max_completion_tokens")
            .filter(|_| self.kind != Kind::Response)
            .or_else(|| self.get(self.kind.max_output_field()))
            .and_then(as_u64)
    }

    /// Bytes of prompt text, and how many chat messages carry it (`None`
    /// for a completion's prompt or an embedding's input, or a chat request
    /// without a `messages` array).
    pub fn prompt_bytes(&self) -> (u64, Option<u64>) {
        (self.prompt.bytes, self.prompt.messages)
    }

    /// The first `AFFINITY_PREFIX_BYTES` of what the model will read
    /// first: the chat messages (role, newline, text, in order), a
    /// completion's prompt or an embedding's input.
    pub fn prompt_prefix(&self) -> &[u8] {
        &self.prompt.prefix
    }

    /// Whether the client asked for a stream (`"stream": true`).
    pub fn streams(&self) -> bool {
        self.get("stream").is_some_and(|v| v.get() == "true")
    }
}

/// A JSON string's text; `None` for any other JSON value.
fn as_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    if !raw.get().starts_with('"') {
        return None;
    }
    serde_json::from_str::<Text<'_>>(raw.get())
        .ok()
        .map(|Text(t)| t)
}

/// A non-negative integer; `None` for any other JSON value.
pub fn as_u64(raw: &RawValue) -> Option<u64> {
    serde_json::from_str(raw.get()).ok()
}

// What text is, in the shapes OpenAI's APIs put it (a string; an array of
// strings and `{"type": "text", "text": ...}` parts; token ids, one token
// each), read by visitors that accept any JSON value, so a request of
// an unexpected shape is estimated rather than refused: the upstream
// judges its shape.

/// Visits for JSON scalars: none is text; an integer where text may be
/// is a token id (one token), given by `$integer(self)`.
macro_rules! visit_scalars {
    ($value:expr, $integer:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(($integer)(self))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(($integer)(self))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// What is read of a value where text may be.
#[derive(Clone, Copy)]
enum Read {
    /// Its bytes of text at any depth: a string's, an array's elements',
    /// an object's (last) `text`.
    Bytes,
    /// A part's `text`: the text if it is a string, and its bytes.
    PartText,
    /// An element of a content array: a string, or a part whose `text`
    /// is one — and, either way, its bytes.
    Part,
    /// A message's `role`: a string, else nothing.
    Role,
}

/// The text of a value (when it is text to read first) and its bytes.
struct Piece<'a> {
    text: Option<Cow<'a, str>>,
    bytes: u64,
}

const NO_TEXT: Piece<'static> = Piece {
    text: None,
    bytes: 0,
};

impl<'de> DeserializeSeed<'de> for Read {
    type Value = Piece<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Piece<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Read {
    type Value = Piece<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    visit_scalars!(NO_TEXT, Read::token_id);
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Piece<'de>, E> {
        Ok(self.string(s.len(), || Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Piece<'de>, E> {
        Ok(self.string(s.len(), || Cow::Owned(s.to_string())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Piece<'de>, A::Error> {
        let mut bytes = 0u64;
        while let Some(p) = seq.next_element_seed(self.nested())? {
            bytes = bytes.saturating_add(p.bytes);
        }
        Ok(Piece { text: None, bytes })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Piece<'de>, A::Error> {
        let mut piece = NO_TEXT;
        while let Some(Text(key)) = map.next_key()? {
            match (self, &*key) {
                (Read::Part, "text") => piece = map.next_value_seed(Read::PartText)?,
                (Read::Bytes | Read::PartText, "text") => {
                    piece.bytes = map.next_value_seed(Read::Bytes)?.bytes;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(piece)
    }
}

impl Read {
    fn string<'a>(self, len: usize, text: impl FnOnce() -> Cow<'a, str>) -> Piece<'a> {
        match self {
            Read::Bytes => Piece {
                text: None,
                bytes: len as u64,
            },
            Read::PartText | Read::Part => Piece {
                text: Some(text()),
                bytes: len as u64,
            },
            Read::Role => Piece {
                text: Some(text()),
                bytes: 0,
            },
        }
    }

    /// A token id (a prompt given as tokens): one token, which the
    /// estimate's one-per-byte bound counts as one byte.
    fn token_id<'a>(self) -> Piece<'a> {
        match self {
            Read::Role => NO_TEXT,
            _ => Piece {
                text: None,
                bytes: 1,
            },
        }
    }

    /// How an array's elements are read: a role has none; anything else
    /// nested in an array only counts.
    fn nested(self) -> Read {
        match self {
            Read::Role => Read::Role,
            _ => Read::Bytes,
        }
    }
}

/// A message's `content`, a `prompt` or an `input`: its text pieces at
/// the top level (a string, or an array's strings and parts' texts) and
/// its bytes of text at any depth.
#[derive(Default)]
struct Content<'a> {
    pieces: Vec<Cow<'a, str>>,
    bytes: u64,
}

impl<'a> Content<'a> {
    fn text(s: Cow<'a, str>) -> Self {
        Content {
            bytes: s.len() as u64,
            pieces: vec![s],
        }
    }
}

impl<'de> Deserialize<'de> for Content<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            visit_scalars!(Content::default(), |_| Content {
                pieces: Vec::new(),
                bytes: 1,
            });
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Content<'de>, E> {
                Ok(Content::text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Content<'de>, E> {
                Ok(Content::text(Cow::Owned(s.to_string())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content<'de>, A::Error> {
                let mut content = Content::default();
                while let Some(part) = seq.next_element_seed(Read::Part)? {
                    content.bytes = content.bytes.saturating_add(part.bytes);
                    content.pieces.extend(part.text);
                }
                Ok(content)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Content<'de>, A::Error> {
                // An object is no text to read first, but its `text` counts.
                let piece = Read::Bytes.visit_map(map)?;
                Ok(Content {
                    pieces: Vec::new(),
                    bytes: piece.bytes,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// One chat message: its role (a string) and content (last of each).
#[derive(Default)]
struct Message<'a> {
    role: Option<Cow<'a, str>>,
    content: Content<'a>,
}

impl<'de> Deserialize<'de> for Message<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            visit_scalars!(Message::default(), |_| Message::default());
            fn visit_str<E>(self, _: &str) -> Result<Message<'de>, E> {
                Ok(Message::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Message<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Message::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message<'de>, A::Error> {
                let mut message = Message::default();
                while let Some(Text(key)) = map.next_key()? {
                    match &*key {
                        "role" => message.role = map.next_value_seed(Read::Role)?.text,
                        "content" => message.content = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(message)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_kept_as_written_and_the_last_duplicate_counts() {
        let body =
            br#"{"model":"m","stream":true,"n":2,"x":{"a":[1, 2]},"n":3,"m\u006fdel":"esc"}"#;
        let r = ProxyRequest::parse(body, Kind::Chat).unwrap();
        assert_eq!(r.model(), "esc", "an escaped key is the same key");
        assert!(r.streams());
        assert_eq!(r.get("n").and_then(as_u64), Some(3));
        assert_eq!(r.get("x").unwrap().get(), r#"{"a":[1, 2]}"#);
        assert_eq!(r.fields().len(), 6);
        let x = r.get("x").unwrap();
        assert!(as_str(x).is_none() && as_u64(x).is_none());
    }

    #[test]
    fn what_is_wrong_is_named() {
        for (bad, says) in [
            (&b"[1]"[..], "must be a JSON object"),
            (b"\"s\"", "must be a JSON object"),
            (b"{", "invalid JSON"),
            (b"{\"model\":\"m\"} x", "invalid JSON"),
            (b"{}", "`model` is required"),
            (b"{\"model\":\"\"}", "`model` is required"),
            (b"{\"model\":3}", "must be a string"),
            (b"{\"model\":null}", "must be a string"),
        ] {
            let e = ProxyRequest::parse(bad, Kind::Chat).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        assert!(
            !ProxyRequest::parse(br#"{"model":"m","stream":"true"}"#, Kind::Chat)
                .unwrap()
                .streams()
        );
    }

    fn prompt(kind: Kind, body: serde_json::Value) -> (u64, Option<u64>, String) {
        prompt_of(kind, &body.to_string())
    }

    fn prompt_of(kind: Kind, text: &str) -> (u64, Option<u64>, String) {
        let r = ProxyRequest::parse(text.as_bytes(), kind).unwrap();
        let (bytes, messages) = r.prompt_bytes();
        (
            bytes,
            messages,
            String::from_utf8_lossy(r.prompt_prefix()).into_owned(),
        )
    }

    /// A response's prompt is its instructions, then its input: text, or
    /// messages with the Responses API's parts.
    #[test]
    fn a_responses_prompt_is_its_instructions_then_its_input() {
        use serde_json::json;
        let text = json!({"model": "m", "instructions": "Be brief.", "input": "Hi"});
        assert_eq!(
            prompt(Kind::Response, text),
            (11, None, "Be brief.Hi".into())
        );
        let items = json!({"model": "m", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "abc"}]}]});
        assert_eq!(
            prompt(Kind::Response, items),
            (3, Some(1), "user\nabc".into())
        );
        let r = ProxyRequest::parse(
            br#"{"model":"m","input":"x","max_output_tokens":5}"#,
            Kind::Response,
        )
        .unwrap();
        assert_eq!(r.max_output(), Some(5));
    }

    #[test]
    fn the_prompt_is_read_in_every_shape() {
        use serde_json::json;
        // Raw text: duplicated keys must reach the reader.
        let chat = r#"{"model": "m", "messages": [
            {"content": "first", "role": "system"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, "b", {"type": "image_url"}, [7, "cd"]]},
            {"role": {"not": "a string"}, "content": {"text": {"text": "deep"}}},
            3,
            {"role": "user", "role": "tool", "content": "x", "content": "yz"}
        ]}"#;
        assert_eq!(
            prompt_of(Kind::Chat, chat),
            (
                5 + 1 + 1 + (1 + 2) + 4 + 2,
                Some(5),
                "system\nfirstuser\nab\n\ntool\nyz".into()
            )
        );
        assert_eq!(
            prompt(
                Kind::Completion,
                json!({"model": "m", "prompt": ["p", "q"]})
            ),
            (2, None, "pq".into())
        );
        assert_eq!(
            prompt(Kind::Embedding, json!({"model": "m", "input": "e\u{e9}"})),
            (3, None, "e\u{e9}".into())
        );
        // Token ids: one token each.
        assert_eq!(
            prompt(Kind::Completion, json!({"model": "m", "prompt": [1, 2, 3]})),
            (3, None, "".into())
        );
        assert_eq!(
            prompt(
                Kind::Completion,
                json!({"model": "m", "prompt": [[1, 2], [3]]})
            ),
            (3, None, "".into())
        );
        // The route decides which field is the prompt: whatever else the
        // body carries is not what the engine reads.
        let both = json!({"model": "m", "messages": [], "prompt": "a long prompt", "input": "i"});
        assert_eq!(prompt(Kind::Chat, both.clone()), (0, Some(0), "".into()));
        assert_eq!(
            prompt(Kind::Completion, both.clone()),
            (13, None, "a long prompt".into())
        );
        assert_eq!(prompt(Kind::Embedding, both), (1, None, "i".into()));
        // `messages` that is not an array still counts what it holds.
        assert_eq!(
            prompt(Kind::Chat, json!({"model": "m", "messages": "hello"})),
            (5, None, "hello".into())
        );
        let long = "x".repeat(5000);
        let (bytes, _, prefix) = prompt(
            Kind::Chat,
            json!({"model": "m", "messages": [{"role": "system", "content": long}, {"role": "user", "content": "tail"}]}),
        );
        assert_eq!((bytes, prefix.len()), (5004, AFFINITY_PREFIX_BYTES));
    }
}
