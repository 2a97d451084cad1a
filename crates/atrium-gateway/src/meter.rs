//! Metering one request: reading the usage an upstream reports, checking
//! it against what the request could have produced, charging the limits
//! and spooling the record.
//!
//! The numbers come from the upstream: an Atrium engine, or — for an
//! `external` deployment — a server the tenant names, which may say
//! anything. A negative count would lower the tenant's recorded usage
//! (other requests' tokens, in effect, refunded) and a huge one would
//! overflow the limiter's sums. So each count is taken only when it lies
//! within what the request could produce: the prompt within the body's
//! own length (a byte-level tokenizer yields at most a token per byte of
//! text, and the JSON around the text is longer than any chat template's
//! per-message tokens) plus a fixed template allowance; the completion
//! within `max_tokens` × `n` when one was set. A count outside is
//! replaced by the nearest count within (0 for a negative one, the bound
//! for one above it) and the record is flagged with what was reported.

use std::sync::Arc;

use crate::limits;
use crate::request::{self, Kind, ProxyRequest};
use crate::usage::{UsageLine, UsageLog};
use crate::Gateway;

/// Tokens a chat template or a default system prompt may add to any
/// prompt beyond its body's bytes.
const TEMPLATE_TOKENS: u64 = 256;
/// The completion bound when the request set no `max_tokens`: the engine
/// decides, up to its context, which no model exceeds.
const UNBOUNDED_COMPLETION: u64 = u32::MAX as u64;

/// What one request could produce at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageBound {
    pub prompt: u64,
    pub completion: u64,
}

impl UsageBound {
    /// The bound of a request whose body is `body_len` bytes; `set_max` is
    /// the `max_tokens` the gateway added, if it did.
    pub fn of(body_len: usize, request: &ProxyRequest<'_>, set_max: Option<u64>) -> UsageBound {
        let prompt = (body_len as u64).saturating_add(TEMPLATE_TOKENS);
        if request.kind() == Kind::Embedding {
            return UsageBound {
                prompt,
                completion: 0,
            };
        }
        let asked = request.max_output().or(set_max);
        let choices = request
            .get("n")
            .and_then(request::as_u64)
            .unwrap_or(1)
            .max(1);
        UsageBound {
            prompt,
            completion: asked.map_or(UNBOUNDED_COMPLETION, |m| m.saturating_mul(choices)),
        }
    }

    /// The counts to bill for what the upstream reported, and the flag
    /// that says what it reported when that was outside the bound.
    pub fn check(&self, reported: (i64, i64)) -> (u64, u64, Option<String>) {
        let (p, c) = reported;
        let clamp = |v: i64, max: u64| u64::try_from(v).map_or(0, |v| v.min(max));
        let (prompt, completion) = (clamp(p, self.prompt), clamp(c, self.completion));
        let as_reported = i64::try_from(prompt) == Ok(p) && i64::try_from(completion) == Ok(c);
        let flag = (!as_reported).then(|| {
            format!(
                "upstream reported prompt_tokens {p} and completion_tokens {c}; this request \
                 could produce at most {} and {}: recorded {prompt} and {completion}",
                self.prompt, self.completion
            )
        });
        (prompt, completion, flag)
    }
}

/// The `usage` of an OpenAI response or stream chunk — chat's and
/// completions' `prompt_tokens`/`completion_tokens`, or the Responses
/// API's `input_tokens`/`output_tokens`, also inside the `response` its
/// last stream event carries. Typed, so the rest of the document is
/// skipped rather than built.
pub fn usage_of(json: &[u8]) -> Option<(i64, i64)> {
    #[derive(serde::Deserialize)]
    struct Usage {
        #[serde(default, alias = "input_tokens")]
        prompt_tokens: i64,
        #[serde(default, alias = "output_tokens")]
        completion_tokens: i64,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        usage: Option<Usage>,
    }
    #[derive(serde::Deserialize)]
    struct WithUsage {
        usage: Option<Usage>,
        response: Option<Inner>,
    }
    let w = serde_json::from_slice::<WithUsage>(json).ok()?;
    let u = w.usage.or(w.response.and_then(|r| r.usage))?;
    Some((u.prompt_tokens, u.completion_tokens))
}

/// What a request's usage record names.
pub struct Meter {
    usage: Arc<UsageLog>,
    tenant: String,
    deployment: String,
    site: String,
    replica: String,
    request_id: String,
    bound: UsageBound,
    /// The Batch API job the request runs for.
    batch: Option<String>,
    /// Kept as its own record when shipped, not only in an aggregate.
    itemised: bool,
    /// The site the request entered at: this one, or the peer's that
    /// forwarded it.
    ingress_site: String,
}

impl Meter {
    pub fn new(
        g: &Gateway,
        tenant: String,
        deployment: String,
        replica: &str,
        request_id: &str,
        bound: UsageBound,
    ) -> Meter {
        Meter {
            usage: g.usage.clone(),
            tenant,
            deployment,
            site: g.site.clone(),
            replica: replica.to_string(),
            request_id: request_id.to_string(),
            bound,
            batch: None,
            itemised: false,
            ingress_site: g.site.clone(),
        }
    }

    /// The request was forwarded here from `site`'s gateway.
    pub fn entered_at(mut self, site: Option<&str>) -> Meter {
        if let Some(site) = site {
            self.ingress_site = site.to_string();
        }
        self
    }

    /// Keeps the request's own record (the tenant asked for them).
    pub fn itemised(mut self, itemised: bool) -> Meter {
        self.itemised = itemised;
        self
    }

    /// Marks the record as a batch's (billed as batch usage).
    pub fn for_batch(mut self, batch: Option<String>) -> Meter {
        self.batch = batch;
        self
    }

    /// Checks the upstream's counts, charges the limiter and spools the
    /// record.
    pub fn record(&self, reported: (i64, i64), ticket: &mut Option<limits::Ticket>) {
        let (prompt, completion, flag) = self.bound.check(reported);
        self.spool(prompt, completion, flag, ticket);
    }

    /// Meters a stream that carried no usage (llama.cpp's server sends
    /// none, and an external upstream may not): the prompt at its bound
    /// and the completion as the chunks streamed (one token each from
    /// such servers), flagged — never left unbilled.
    pub fn record_unreported(&self, chunks: u64, ticket: &mut Option<limits::Ticket>) {
        let completion = chunks.min(self.bound.completion);
        let flag = format!(
            "the stream reported no usage: prompt recorded at its bound ({}), completion as the {chunks} chunks streamed",
            self.bound.prompt
        );
        self.spool(self.bound.prompt, completion, Some(flag), ticket);
    }

    fn spool(
        &self,
        prompt: u64,
        completion: u64,
        flag: Option<String>,
        ticket: &mut Option<limits::Ticket>,
    ) {
        if let Some(flag) = &flag {
            tracing::warn!(request_id = %self.request_id, tenant = %self.tenant, replica = %self.replica, %flag, "gateway: upstream usage replaced");
        }
        if let Some(t) = ticket {
            t.charge(prompt.saturating_add(completion));
        }
        let at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let record = UsageLine {
            at: &at,
            tenant: &self.tenant,
            deployment: &self.deployment,
            site: &self.site,
            replica: &self.replica,
            // Both within u32::MAX-scale bounds plus a body length: they fit.
            prompt_tokens: i64::try_from(prompt).unwrap_or(i64::MAX),
            completion_tokens: i64::try_from(completion).unwrap_or(i64::MAX),
            request_id: &self.request_id,
            flag: flag.as_deref(),
            batch: self.batch.as_deref(),
            itemised: self.itemised,
            ingress_site: &self.ingress_site,
        };
        if let Err(e) = self.usage.append(&record) {
            tracing::error!(error = %e, request_id = %self.request_id, "gateway: usage not spooled");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound_of(kind: Kind, body: serde_json::Value, set_max: Option<u64>) -> UsageBound {
        let text = body.to_string();
        let request = ProxyRequest::parse(text.as_bytes(), kind).unwrap();
        UsageBound::of(text.len(), &request, set_max)
    }

    #[test]
    fn a_request_bounds_what_it_can_be_billed() {
        let chat = serde_json::json!({"model": "m", "max_tokens": 10, "n": 2,
            "messages": [{"role": "user", "content": "hi"}]});
        let len = chat.to_string().len() as u64;
        let b = bound_of(Kind::Chat, chat, None);
        assert_eq!(
            b,
            UsageBound {
                prompt: len + TEMPLATE_TOKENS,
                completion: 20
            }
        );
        let open = serde_json::json!({"model": "m", "prompt": "hi"});
        assert_eq!(
            bound_of(Kind::Completion, open.clone(), Some(7)).completion,
            7
        );
        assert_eq!(
            bound_of(Kind::Completion, open, None).completion,
            UNBOUNDED_COMPLETION
        );
        let embed = serde_json::json!({"model": "e", "input": "x", "max_tokens": 9});
        assert_eq!(bound_of(Kind::Embedding, embed, None).completion, 0);
    }

    /// A response is bounded by `max_output_tokens` (never by a chat
    /// field it does not have), and its usage is read in both of the
    /// Responses API's places: the body, and its stream's last event.
    #[test]
    fn a_response_is_bounded_and_read_by_the_responses_apis_own_fields() {
        let r = serde_json::json!({"model": "m", "input": "hi", "max_output_tokens": 12,
            "max_completion_tokens": 99});
        assert_eq!(bound_of(Kind::Response, r, None).completion, 12);
        let body = br#"{"object":"response","usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12}}"#;
        assert_eq!(usage_of(body), Some((5, 7)));
        let last = br#"{"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":4}}}"#;
        assert_eq!(usage_of(last), Some((3, 4)));
        let first = br#"{"type":"response.created","response":{"usage":null}}"#;
        assert_eq!(usage_of(first), None);
        let delta = br#"{"type":"response.output_text.delta","delta":"Hi"}"#;
        assert_eq!(usage_of(delta), None);
    }

    #[test]
    fn counts_outside_the_bound_are_clamped_and_flagged() {
        let b = UsageBound {
            prompt: 300,
            completion: 10,
        };
        assert_eq!(b.check((7, 2)), (7, 2, None));
        assert_eq!(b.check((300, 10)), (300, 10, None));
        let (p, c, flag) = b.check((-1_000_000, -5));
        assert_eq!((p, c), (0, 0));
        assert!(flag.unwrap().contains("-1000000"));
        let (p, c, flag) = b.check((i64::MAX, 3));
        assert_eq!((p, c), (300, 3));
        assert!(flag.is_some());
        let (p, c, _) = b.check((5, 11));
        assert_eq!((p, c), (5, 10));
    }
}
