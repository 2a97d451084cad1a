//! `logprobs`: each generated token's log-probability and its most
//! likely alternatives, in the shapes OpenAI gives them — per token with
//! `bytes` in chat (a token may be part of a character), parallel lists
//! with text offsets in completions.
//!
//! The probabilities are the model's, after the presence and frequency
//! penalties and before temperature and top_p, as vLLM reports them by
//! default: what the model thought of each token, not how boldly it was
//! sampled.

use serde_json::{json, Value};

/// The most alternatives a request may ask for per token (chat's
/// `top_logprobs`; completions allow 5, as OpenAI's).
pub const MAX_TOP_LOGPROBS: usize = 20;
pub const MAX_COMPLETION_LOGPROBS: usize = 5;

/// One token's bytes and log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A generated token, scored, with the `top` most likely tokens at its
/// place.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: Scored,
    pub top: Vec<Scored>,
}

/// The log-softmax of `row` at `chosen`, and the `top` best tokens, each
/// named by `bytes_of`.
pub(crate) fn score(
    row: &[f32],
    chosen: u32,
    top: usize,
    bytes_of: impl Fn(u32) -> Vec<u8>,
) -> TokenLogprob {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = row
        .iter()
        .map(|l| f64::from(l - max).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    let logprob = |id: u32| {
        row.get(id as usize)
            .map_or(f32::NEG_INFINITY, |l| l - log_sum)
    };
    let mut best: Vec<u32> = (0..row.len() as u32).collect();
    let top = top.min(best.len());
    if top > 0 {
        let by_logit = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]);
        best.select_nth_unstable_by(top - 1, by_logit);
        best.truncate(top);
        best.sort_unstable_by(by_logit);
    } else {
        best.clear();
    }
    let scored = |id: u32| Scored {
        bytes: bytes_of(id),
        logprob: logprob(id),
    };
    TokenLogprob {
        token: scored(chosen),
        top: best.into_iter().map(scored).collect(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Chat's `logprobs` of a choice or chunk.
pub(crate) fn chat_json(tokens: &[TokenLogprob]) -> Value {
    let entry =
        |s: &Scored| json!({"token": text(&s.bytes), "logprob": s.logprob, "bytes": s.bytes});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.token);
            e["top_logprobs"] = t.top.iter().map(entry).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions' `logprobs`, its text offsets counted from `offset` (the
/// bytes of text before these tokens).
pub(crate) fn completion_json(tokens: &[TokenLogprob], offset: usize) -> Value {
    let mut at = offset;
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        offsets.push(at);
        at += t.token.bytes.len();
    }
    json!({
        "tokens": tokens.iter().map(|t| text(&t.token.bytes)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.token.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            t.top.iter().map(|s| (text(&s.bytes), json!(s.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_a_log_softmax_and_the_top_come_best_first() {
        let row = [1.0f32, 3.0, 2.0, -1.0];
        let t = score(&row, 2, 2, |id| vec![b'a' + id as u8]);
        let total: f32 = row.iter().map(|l| l.exp()).sum();
        assert!((t.token.logprob - (2.0f32.exp() / total).ln()).abs() < 1e-5);
        assert_eq!(t.top.iter().map(|s| s.bytes[0]).collect::<Vec<_>>(), b"bc");
        assert!(t.top[0].logprob > t.top[1].logprob);
        assert!(score(&row, 0, 0, |_| Vec::new()).top.is_empty());
        // Enormous logits do not overflow.
        let t = score(&[1e30, 0.0], 0, 1, |_| Vec::new());
        assert_eq!(t.token.logprob, 0.0);
    }

    #[test]
    fn completions_offsets_run_on_from_the_text_before() {
        let tok = |b: &str| TokenLogprob {
            token: Scored {
                bytes: b.as_bytes().to_vec(),
                logprob: -0.5,
            },
            top: vec![],
        };
        let v = completion_json(&[tok("Hel"), tok("lo")], 10);
        assert_eq!(v["text_offset"], json!([10, 13]));
        assert_eq!(v["tokens"], json!(["Hel", "lo"]));
        let chat = chat_json(&[tok("é")]);
        assert_eq!(chat["content"][0]["bytes"], json!([0xc3, 0xa9]));
    }
}
