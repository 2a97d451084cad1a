//! Tenant API keys. A key is shown once as `atr_<id>_<secret>`; only the
//! SHA-256 digest of the whole token is stored, so a leaked database yields
//! no usable key.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::limits::RequestLimits;
use crate::FieldErrors;

/// Prefix of every tenant API key.
pub const KEY_PREFIX: &str = "atr_";

/// What a key may do. `admin` implies the others.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Manage the tenant's resources and keys.
    Admin,
    /// Call the tenant's models through the gateway.
    Inference,
    /// Read the tenant's resources.
    Read,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub scopes: Vec<Scope>,
    /// When the key stops working (RFC 3339); never when absent.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
    /// Requests admitted to this key in any rolling minute (the gateway
    /// enforces this and the three limits below).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Prompt + completion tokens in any rolling minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Prompt + completion tokens per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u64>,
}

impl KeySpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        if self.scopes.is_empty() {
            errors.push("scopes", "name at least one of admin, inference, read");
        }
        self.limits().validate(&mut errors);
        errors.into_result()
    }

    pub fn limits(&self) -> RequestLimits {
        RequestLimits {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_day: self.tokens_per_day,
            max_concurrent_requests: self.max_concurrent_requests,
        }
    }
}

/// Splits a presented token into key id and secret, or `None` when it is
/// not shaped like an Atrium key. Says nothing about validity.
pub fn split_key_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let well_formed = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    (well_formed(id) && well_formed(secret)).then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::split_key_token;

    #[test]
    fn splits_only_well_formed_tokens() {
        assert_eq!(split_key_token("atr_k1a2_s3cr3t"), Some(("k1a2", "s3cr3t")));
        for bad in [
            "",
            "atr_",
            "atr_id",
            "atr__s",
            "atr_id_",
            "xyz_id_s",
            "atr_i-d_s",
            "atr_id_s_t",
        ] {
            assert_eq!(split_key_token(bad), None, "{bad}");
        }
    }
}
