//! The body a request goes upstream with: the client's JSON with the
//! gateway's changes (the tenant's `cache_salt`, `stream_options`, a
//! `max_tokens` cap, an external model's name).
//!
//! Written anew only when a change touches a field the client sent; the
//! usual changes add fields the client did not send, and those are spliced
//! in after the opening brace of the client's own bytes — the same JSON
//! object without building its text again on every request.

use bytes::Bytes;
use serde_json::{Map, Value};

pub struct Outgoing {
    original: Bytes,
    /// The request as the upstream will see it.
    value: Map<String, Value>,
    /// Fields added that the client did not send, in order.
    added: Vec<(&'static str, Value)>,
    /// A field the client sent was changed or removed.
    rewrite: bool,
}

impl Outgoing {
    /// `original` is the text `value` was parsed from.
    pub fn new(original: Bytes, value: Map<String, Value>) -> Self {
        Outgoing {
            original,
            value,
            added: Vec::new(),
            rewrite: false,
        }
    }

    pub fn value(&self) -> &Map<String, Value> {
        &self.value
    }

    pub fn set(&mut self, key: &'static str, v: Value) {
        if let Some(slot) = self.added.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = v.clone();
        } else if self.value.contains_key(key) {
            self.rewrite = true;
        } else {
            self.added.push((key, v.clone()));
        }
        self.value.insert(key.to_string(), v);
    }

    pub fn remove(&mut self, key: &str) {
        if self.value.remove(key).is_some() {
            let added = self.added.len();
            self.added.retain(|(k, _)| *k != key);
            // Removing a field the gateway added leaves the client's text.
            self.rewrite |= self.added.len() == added;
        }
    }

    /// The text to send.
    pub fn encode(&self) -> Bytes {
        if self.rewrite {
            return Bytes::from(Value::Object(self.value.clone()).to_string());
        }
        if self.added.is_empty() {
            return self.original.clone();
        }
        let Some(brace) = self.original.iter().position(|b| *b == b'{') else {
            return Bytes::from(Value::Object(self.value.clone()).to_string());
        };
        let mut out = Vec::with_capacity(self.original.len() + 128);
        out.extend_from_slice(&self.original[..=brace]);
        for (key, v) in &self.added {
            out.push(b'"');
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(v.to_string().as_bytes());
            out.push(b',');
        }
        out.extend_from_slice(&self.original[brace + 1..]);
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn outgoing(text: &str) -> Outgoing {
        let Value::Object(map) = serde_json::from_str(text).unwrap() else {
            panic!("not an object")
        };
        Outgoing::new(Bytes::from(text.to_string()), map)
    }

    fn sent(o: &Outgoing) -> Value {
        serde_json::from_slice(&o.encode()).unwrap()
    }

    #[test]
    fn untouched_bodies_go_as_they_came() {
        let text = " { \"model\" : \"m\", \"x\": [1, 2] }";
        let o = outgoing(text);
        assert_eq!(&o.encode()[..], text.as_bytes());
    }

    #[test]
    fn added_fields_are_spliced_and_changed_ones_rewritten() {
        let mut o = outgoing("{\"model\":\"m\",\"stream\":true}");
        o.set("cache_salt", json!("abc"));
        o.set("stream_options", json!({"include_usage": true}));
        o.set("cache_salt", json!("def"));
        assert!(o.encode().starts_with(b"{\"cache_salt\":\"def\","));
        assert_eq!(
            sent(&o),
            json!({"model": "m", "stream": true, "cache_salt": "def", "stream_options": {"include_usage": true}})
        );
        o.remove("cache_salt");
        assert_eq!(
            sent(&o),
            json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}})
        );

        let mut o = outgoing("{\"model\":\"m\",\"cache_salt\":\"client's\"}");
        o.set("cache_salt", json!("tenant's"));
        assert_eq!(sent(&o), json!({"model": "m", "cache_salt": "tenant's"}));
        let mut o = outgoing("{\"model\":\"m\",\"cache_salt\":\"client's\"}");
        o.remove("cache_salt");
        assert_eq!(sent(&o), json!({"model": "m"}));
    }
}
