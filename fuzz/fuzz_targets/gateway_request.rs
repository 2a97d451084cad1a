//! Everything the gateway does with a request's bytes before it trusts
//! them: the HTTP/1.1 heads and chunked framing (its own parser, both
//! sides), the body parse, the token estimate, the affinity prefix and key,
//! the body sent upstream, and the API-key split of an `Authorization`
//! header. None may panic, and what they return must be self-consistent.
#![no_main]

use atrium_gateway::affinity::{affinity_key, AFFINITY_PREFIX_BYTES};
use atrium_gateway::http1::{parse_request_head, parse_response_head, ChunkedDecoder};
use atrium_gateway::outgoing::Outgoing;
use atrium_gateway::request::{Kind, ProxyRequest};
use atrium_gateway::{token_estimate, DEFAULT_MAX_TOKENS_UNDER_LIMIT};
use libfuzzer_sys::fuzz_target;

/// Decodes `data` as a chunked body fed in two pieces split at `at`.
fn dechunk(data: &[u8], at: usize) -> Result<(Vec<u8>, usize, bool), &'static str> {
    let mut d = ChunkedDecoder::default();
    let mut out = Vec::new();
    let first = d.decode(&data[..at], &mut out)?;
    let used = if d.is_done() {
        first
    } else {
        first + d.decode(&data[at..], &mut out)?
    };
    Ok((out, used, d.is_done()))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, len))) = parse_request_head(data) {
        assert!(len <= data.len());
        assert!(!head.path.contains('?'));
    }
    if let Ok(Some((_, len))) = parse_response_head(data) {
        assert!(len <= data.len());
    }
    // Framing must not depend on how the bytes arrive.
    if let (Ok(whole), Ok(split)) = (dechunk(data, data.len()), dechunk(data, data.len() / 2)) {
        if whole.2 && split.2 {
            assert_eq!(whole, split);
        }
        assert!(whole.0.len() <= data.len());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some((id, secret)) = atrium_core::key::split_key_token(text) {
            assert!(!id.is_empty() && !secret.is_empty());
        }
    }
    // The route decides the kind; any body may arrive on any route.
    let kind = [Kind::Chat, Kind::Completion, Kind::Embedding, Kind::Response][data.len() % 4];
    let Ok(request) = ProxyRequest::parse(data, kind) else {
        return;
    };
    // The oracle: the same bytes read by serde_json's own map (a
    // duplicated key counts as its last occurrence). It cannot hold a
    // number out of f64's range, which the gateway passes on as written.
    let Ok(serde_json::Value::Object(mut expected)) = serde_json::from_slice(data) else {
        return;
    };
    assert_eq!(
        expected.get("model").and_then(|m| m.as_str()),
        Some(request.model())
    );
    assert!(!request.model().is_empty());
    let prefix = request.prompt_prefix();
    assert!(prefix.len() <= AFFINITY_PREFIX_BYTES);
    let _ = affinity_key("salt", prefix);
    for cap in [None, Some(1), Some(u64::MAX)] {
        let (estimate, set_max) = token_estimate(&request, cap);
        if let Some(m) = set_max {
            assert!((1..=DEFAULT_MAX_TOKENS_UNDER_LIMIT).contains(&m));
            assert!(estimate >= m);
        }
    }
    // What goes upstream is the request with the gateway's changes, and
    // nothing else, whether spliced into the client's text or rewritten.
    let mut upstream = Outgoing::new(bytes::Bytes::copy_from_slice(data), request);
    upstream.set("cache_salt", &"tenant salt");
    upstream.set("stream_options", &serde_json::json!({"include_usage": true}));
    upstream.remove("user");
    expected.insert("cache_salt".into(), "tenant salt".into());
    expected.insert(
        "stream_options".into(),
        serde_json::json!({"include_usage": true}),
    );
    expected.remove("user");
    let sent: serde_json::Value =
        serde_json::from_slice(&upstream.encode()).expect("the upstream body is JSON");
    assert_eq!(sent, serde_json::Value::Object(expected));
});
