//! The body a request goes upstream with: the client's JSON with the
//! gateway's changes (the tenant's `cache_salt`, `stream_options`, a
//! `max_tokens` cap, an external model's name).
//!
//! Fields the client did not send are spliced in after the opening brace
//! of the client's own bytes — the same JSON object, its text not built
//! again. A change to a field the client sent (or its removal) writes the
//! object out again from the client's fields, as written, less the ones
//! replaced or removed, plus the gateway's.

use bytes::Bytes;
use serde::Serialize;

use crate::request::ProxyRequest;

pub struct Outgoing<'a> {
    original: Bytes,
    request: ProxyRequest<'a>,
    /// Fields the gateway sets, as JSON text, in order.
    added: Vec<(&'static str, Vec<u8>)>,
    /// Fields the client sent that do not go upstream as sent (replaced
    /// by an added field, or removed).
    dropped: Vec<&'static str>,
}

impl<'a> Outgoing<'a> {
    /// `original` is the text `request` was read from.
    pub fn new(original: Bytes, request: ProxyRequest<'a>) -> Self {
        Outgoing {
            original,
            request,
            added: Vec::new(),
            dropped: Vec::new(),
        }
    }

    /// The request as the client sent it.
    pub fn request(&self) -> &ProxyRequest<'a> {
        &self.request
    }

    /// Sets a field to `v` (replacing the client's, if it sent one).
    pub fn set(&mut self, key: &'static str, v: &impl Serialize) {
        let text = serde_json::to_vec(v).unwrap_or_else(|_| b"null".to_vec());
        if let Some(slot) = self.added.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = text;
            return;
        }
        self.added.push((key, text));
        self.drop_clients(key);
    }

    /// Removes a field, the client's or the gateway's.
    pub fn remove(&mut self, key: &'static str) {
        self.added.retain(|(k, _)| *k != key);
        self.drop_clients(key);
    }

    fn drop_clients(&mut self, key: &'static str) {
        if self.request.get(key).is_some() && !self.dropped.contains(&key) {
            self.dropped.push(key);
        }
    }

    /// The text to send.
    pub fn encode(&self) -> Bytes {
        if self.added.is_empty() && self.dropped.is_empty() {
            return self.original.clone();
        }
        let mut out = Vec::with_capacity(self.original.len() + 128);
        let brace = self.original.iter().position(|b| *b == b'{');
        match brace {
            Some(brace) if self.dropped.is_empty() => {
                out.extend_from_slice(&self.original[..=brace]);
                self.write_added(&mut out);
                out.extend_from_slice(&self.original[brace + 1..]);
            }
            _ => {
                out.push(b'{');
                self.write_added(&mut out);
                for (key, value) in self.request.fields() {
                    if self.dropped.iter().any(|d| *d == key) {
                        continue;
                    }
                    // A string always serialises.
                    let _ = serde_json::to_writer(&mut out, key);
                    out.push(b':');
                    out.extend_from_slice(value.get().as_bytes());
                    out.push(b',');
                }
                if out.last() == Some(&b',') {
                    out.pop();
                }
                out.push(b'}');
            }
        }
        Bytes::from(out)
    }

    /// Each added field and a comma.
    fn write_added(&self, out: &mut Vec<u8>) {
        for (key, v) in &self.added {
            out.push(b'"');
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(v);
            out.push(b',');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn outgoing(text: &'static str) -> Outgoing<'static> {
        let request = ProxyRequest::parse(text.as_bytes(), crate::request::Kind::Chat).unwrap();
        Outgoing::new(Bytes::from_static(text.as_bytes()), request)
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
        o.set("cache_salt", &"abc");
        o.set("stream_options", &json!({"include_usage": true}));
        o.set("cache_salt", &"def");
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
        o.set("cache_salt", &"tenant's");
        assert_eq!(sent(&o), json!({"model": "m", "cache_salt": "tenant's"}));
        let mut o = outgoing("{\"model\":\"m\",\"cache_salt\":\"client's\"}");
        o.remove("cache_salt");
        assert_eq!(sent(&o), json!({"model": "m"}));
    }

    #[test]
    fn a_client_field_is_replaced_everywhere_it_appears() {
        // Duplicated, and spelt with an escape: every occurrence goes.
        let mut o = outgoing(
            r#"{"cache_salt":"a","model":"m","x":[1,{"y":"\u00e9"}],"cache\u005fsalt":"b"}"#,
        );
        o.set("cache_salt", &"ours");
        o.set("model", &"theirs");
        let text = o.encode();
        assert_eq!(
            serde_json::from_slice::<Value>(&text).unwrap(),
            json!({"cache_salt": "ours", "model": "theirs", "x": [1, {"y": "é"}]})
        );
        let text = std::str::from_utf8(&text).unwrap();
        assert_eq!(text.matches("cache").count(), 1, "{text}");
        assert!(
            text.contains(r#""x":[1,{"y":"\u00e9"}]"#),
            "kept as written: {text}"
        );
    }
}
