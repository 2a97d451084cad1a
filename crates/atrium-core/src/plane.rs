//! Credentials of the runtime and data planes. An agent holds a node
//! credential that reaches only its node's work; a gateway holds a site
//! credential that reaches only its site's routing and usage. Neither
//! holds the provider's admin token: a compromised node or gateway then
//! owns its own work, not the control plane.
//!
//! A plane gets its credential by exchanging a one-time join token the
//! provider issued for it (`atrium node join`, `atrium gateway join`).
//! Tokens are shown once and stored as SHA-256 digests, like API keys:
//! `atrj_<id>_<secret>` (join), `atrn_<id>_<secret>` (node),
//! `atrg_<id>_<secret>` (gateway).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::name::validate_name;
use crate::FieldErrors;

/// Prefix of one-time join tokens.
pub const JOIN_TOKEN_PREFIX: &str = "atrj_";

/// Which plane a credential is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Plane {
    /// A node's agent: reads its node's placements, reports their status,
    /// registers its node.
    Node,
    /// A site's gateway: reads keys, deployments, tenants and its site's
    /// placements, records its site's usage.
    Gateway,
}

impl Plane {
    pub fn as_str(self) -> &'static str {
        match self {
            Plane::Node => "node",
            Plane::Gateway => "gateway",
        }
    }

    /// Prefix of this plane's credential tokens.
    pub fn token_prefix(self) -> &'static str {
        match self {
            Plane::Node => "atrn_",
            Plane::Gateway => "atrg_",
        }
    }

    /// The plane a credential token is for, from its prefix.
    pub fn of_token(token: &str) -> Option<Plane> {
        [Plane::Node, Plane::Gateway]
            .into_iter()
            .find(|p| token.starts_with(p.token_prefix()))
    }
}

/// Most joins one token may admit (a DaemonSet's nodes, say).
pub const MAX_JOIN_USES: u32 = 10_000;

/// Who a join token lets join: one named node or gateway of one site, or
/// — with no name — up to `uses` new ones, each naming itself when it
/// joins (what a Kubernetes DaemonSet of agents needs). A token without a
/// name never joins a name that already has a credential: it cannot take
/// over an existing node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenSpec {
    pub plane: Plane,
    /// The node's (or gateway's) name; empty: each joiner names itself.
    pub name: String,
    pub site: String,
    /// When the token stops working if unused (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
    /// Joins it admits [default: 1]; more than one only without a name.
    #[serde(default = "one_use")]
    pub uses: u32,
}

fn one_use() -> u32 {
    1
}

impl JoinTokenSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        if !self.name.is_empty() {
            errors.check("name", validate_name(&self.name));
            if self.uses != 1 {
                errors.push(
                    "uses",
                    "a token naming its node joins once; leave the name out to let several join",
                );
            }
        } else if !(1..=MAX_JOIN_USES).contains(&self.uses) {
            errors.push("uses", format!("must be 1 to {MAX_JOIN_USES}"));
        }
        errors.check("site", validate_name(&self.site));
        errors.into_result()
    }
}

/// What a plane credential may reach: its node, or its site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    pub plane: Plane,
    pub name: String,
    pub site: String,
}

impl CredentialSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        errors.check("name", validate_name(&self.name));
        errors.check("site", validate_name(&self.site));
        errors.into_result()
    }
}

/// Splits a token of the form `<prefix><id>_<secret>` into id and secret,
/// or `None` when it is not shaped so. Says nothing about validity.
pub fn split_token<'a>(prefix: &str, token: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = token.strip_prefix(prefix)?;
    let (id, secret) = rest.split_once('_')?;
    let well_formed = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    (well_formed(id) && well_formed(secret)).then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_plane_and_split_strictly() {
        assert_eq!(Plane::of_token("atrn_abc_def"), Some(Plane::Node));
        assert_eq!(Plane::of_token("atrg_abc_def"), Some(Plane::Gateway));
        assert_eq!(Plane::of_token("atr_abc_def"), None);
        assert_eq!(split_token("atrn_", "atrn_c1_s3"), Some(("c1", "s3")));
        for bad in [
            "atrn_",
            "atrn_c1",
            "atrn__s",
            "atrn_c-1_s",
            "atrg_c1_s",
            "atrn_c1_s_x",
        ] {
            assert_eq!(split_token("atrn_", bad), None, "{bad}");
        }
        let spec = CredentialSpec {
            plane: Plane::Node,
            name: "Bad Name".into(),
            site: "eu".into(),
        };
        assert!(spec.validate().is_err());
    }
}
