//! Request limits the gateway enforces per key and per tenant: requests and
//! tokens per minute, a daily token budget, and requests in flight. Keys and
//! quotas carry them as flat, optional fields (absent means unlimited); this
//! module gathers them into one value and validates them.

use serde::{Deserialize, Serialize};

use crate::FieldErrors;

/// The four request limits of one scope (a key or a tenant).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestLimits {
    /// Requests admitted in any rolling minute.
    pub requests_per_minute: Option<u64>,
    /// Prompt + completion tokens in any rolling minute.
    pub tokens_per_minute: Option<u64>,
    /// Prompt + completion tokens per UTC calendar day.
    pub tokens_per_day: Option<u64>,
    /// Requests in flight at once.
    pub max_concurrent_requests: Option<u64>,
}

impl RequestLimits {
    /// Whether nothing is limited (the gateway then keeps no state).
    pub fn is_unlimited(&self) -> bool {
        *self == RequestLimits::default()
    }

    /// Whether a token limit applies (the gateway then estimates tokens).
    pub fn limits_tokens(&self) -> bool {
        self.tokens_per_minute.is_some() || self.tokens_per_day.is_some()
    }

    /// Every limit present must be at least 1: a scope that should serve
    /// nothing is revoked or has no deployments, not a limit of zero.
    pub fn validate(&self, errors: &mut FieldErrors) {
        for (field, value) in [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
            ("tokens_per_day", self.tokens_per_day),
            ("max_concurrent_requests", self.max_concurrent_requests),
        ] {
            if value == Some(0) {
                errors.push(field, "must be at least 1 (leave it out for no limit)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_limits_are_refused_by_name() {
        let mut errors = FieldErrors::new();
        RequestLimits {
            requests_per_minute: Some(0),
            tokens_per_day: Some(5),
            max_concurrent_requests: Some(0),
            ..Default::default()
        }
        .validate(&mut errors);
        let err = errors.into_result().unwrap_err();
        let text = format!("{err:?}");
        assert!(text.contains("requests_per_minute"), "{text}");
        assert!(text.contains("max_concurrent_requests"), "{text}");
        assert!(!text.contains("tokens_per_day"), "{text}");
        assert!(RequestLimits::default().is_unlimited());
    }
}
