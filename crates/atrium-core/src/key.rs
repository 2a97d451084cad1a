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

    /// Checks that `self`, replacing `old`, only narrows what the key may
    /// do: no scope it did not have, no later expiry (so an expired key
    /// stays expired and a key that never expired may be given an expiry).
    /// To widen, issue a new key: its creation is audited as such.
    pub fn narrows(&self, old: &KeySpec) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        let added: Vec<String> = self
            .scopes
            .iter()
            .filter(|s| !old.scopes.contains(s))
            .map(|s| format!("{s:?}").to_lowercase())
            .collect();
        if !added.is_empty() {
            errors.push(
                "scopes",
                format!(
                    "a key's scopes can only be narrowed; it does not have {}: create a new key",
                    added.join(", ")
                ),
            );
        }
        match (old.expires_at, self.expires_at) {
            (Some(old), None) => errors.push(
                "expires_at",
                format!("the key expires at {old}; an expiry can only be moved earlier"),
            ),
            (Some(old), Some(new)) if new > old => errors.push(
                "expires_at",
                format!("the key expires at {old}; an expiry can only be moved earlier"),
            ),
            _ => {}
        }
        errors.into_result()
    }

    /// A key with these scopes, expiry and request limits. (On the wire
    /// the limits are flat fields of the spec.)
    pub fn new(
        scopes: Vec<Scope>,
        expires_at: Option<OffsetDateTime>,
        limits: RequestLimits,
    ) -> KeySpec {
        KeySpec {
            scopes,
            expires_at,
            requests_per_minute: limits.requests_per_minute,
            tokens_per_minute: limits.tokens_per_minute,
            tokens_per_day: limits.tokens_per_day,
            max_concurrent_requests: limits.max_concurrent_requests,
        }
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
    crate::plane::split_token(KEY_PREFIX, token)
}

#[cfg(test)]
mod tests {
    use super::{split_key_token, KeySpec, Scope};
    use time::OffsetDateTime;

    fn spec(scopes: &[Scope], expires_at: Option<OffsetDateTime>) -> KeySpec {
        KeySpec::new(scopes.to_vec(), expires_at, Default::default())
    }

    #[test]
    fn updates_may_only_narrow_scopes_and_expiry() {
        let day = time::Duration::days(1);
        let then = OffsetDateTime::UNIX_EPOCH + day * 20_000;
        let old = spec(&[Scope::Inference, Scope::Read], Some(then));
        assert!(spec(&[Scope::Inference], Some(then - day))
            .narrows(&old)
            .is_ok());
        assert!(spec(&[Scope::Inference, Scope::Admin], Some(then))
            .narrows(&old)
            .is_err());
        assert!(spec(&[Scope::Inference], Some(then + day))
            .narrows(&old)
            .is_err());
        assert!(spec(&[Scope::Inference], None).narrows(&old).is_err());
        assert!(spec(&[Scope::Read], Some(then))
            .narrows(&spec(&[Scope::Read], None))
            .is_ok());
    }

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
