//! Everything the gateway does with a request's bytes before it trusts
//! them: the body parse, the token estimate, the affinity prefix and key,
//! and the API-key split of an `Authorization` header. None may panic,
//! and what they return must be self-consistent.
#![no_main]

use atrium_gateway::affinity::{affinity_key, prompt_prefix, AFFINITY_PREFIX_BYTES};
use atrium_gateway::{parse_request, token_estimate, DEFAULT_MAX_TOKENS_UNDER_LIMIT};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some((id, secret)) = atrium_core::key::split_key_token(text) {
            assert!(!id.is_empty() && !secret.is_empty());
        }
    }
    let Ok((map, model)) = parse_request(data) else {
        return;
    };
    assert!(!model.is_empty());
    let body = serde_json::Value::Object(map);
    let prefix = prompt_prefix(&body);
    assert!(prefix.len() <= AFFINITY_PREFIX_BYTES);
    let _ = affinity_key("salt", &prefix);
    for cap in [None, Some(1), Some(u64::MAX)] {
        let (estimate, set_max) = token_estimate(&body, cap);
        if let Some(m) = set_max {
            assert!((1..=DEFAULT_MAX_TOKENS_UNDER_LIMIT).contains(&m));
            assert!(estimate >= m);
        }
    }
});
