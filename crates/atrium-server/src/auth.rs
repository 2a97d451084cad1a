//! Authentication: who is calling. The provider admin holds one token made
//! at first start; tenants hold API keys; each node's agent and each
//! site's gateway holds a plane credential. Only SHA-256 digests of any of
//! them are stored, and digests are compared in constant time.

use atrium_core::key::{split_key_token, Scope};
use atrium_core::plane::{split_token, CredentialSpec, Plane};
use atrium_store::Store;
use axum::http::HeaderMap;
use rand::distributions::Alphanumeric;
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::ApiError;

/// Prefix of the provider admin token.
pub const ADMIN_TOKEN_PREFIX: &str = "atradm_";
const ADMIN_DIGEST_META: &str = "admin_token_sha256";

/// Roles, from most to least powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs the cloud: every tenant, every resource.
    ProviderAdmin,
    /// Manages one tenant's resources and keys.
    TenantAdmin,
    /// Reads one tenant's resources.
    Viewer,
    /// Calls one tenant's models; nothing on the control plane.
    TenantMember,
    /// A node's agent: its node and that node's placements only.
    Node,
    /// A site's gateway: what routing and metering at its site need.
    Gateway,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ProviderAdmin => "provider-admin",
            Role::TenantAdmin => "tenant-admin",
            Role::Viewer => "viewer",
            Role::TenantMember => "tenant-member",
            Role::Node => "node",
            Role::Gateway => "gateway",
        }
    }

    /// The role `as_str` names.
    pub fn parse(s: &str) -> Option<Role> {
        [
            Role::ProviderAdmin,
            Role::TenantAdmin,
            Role::Viewer,
            Role::TenantMember,
            Role::Node,
            Role::Gateway,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    /// Whether this role is `other` or a more powerful one.
    pub fn at_least(self, other: Role) -> bool {
        let rank = |r: Role| match r {
            Role::ProviderAdmin => 3,
            Role::TenantAdmin => 2,
            Role::Viewer => 1,
            Role::TenantMember | Role::Node | Role::Gateway => 0,
        };
        rank(self) >= rank(other)
    }

    /// The control-plane role a key's scopes give.
    pub fn from_scopes(scopes: &[Scope]) -> Role {
        if scopes.contains(&Scope::Admin) {
            Role::TenantAdmin
        } else if scopes.contains(&Scope::Read) {
            Role::Viewer
        } else {
            Role::TenantMember
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// The caller's tenant; `None` only for the provider admin.
    pub tenant: Option<String>,
    /// For the audit trail: `admin`, the key id, or `node:<name>` /
    /// `gateway:<name>`.
    pub actor: String,
    /// For the node and gateway roles: what their credential reaches.
    pub plane: Option<CredentialSpec>,
    /// A tenant key that may call models (`inference` or `admin` scope):
    /// what the Batch API asks, whatever the key's control-plane role.
    pub may_infer: bool,
}

impl Caller {
    /// The site a gateway's credential is for.
    pub fn gateway_site(&self) -> Option<&str> {
        self.plane
            .as_ref()
            .filter(|p| p.plane == Plane::Gateway)
            .map(|p| p.site.as_str())
    }
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub(crate) fn digests_equal(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// `n` random alphanumeric characters from the OS-seeded CSPRNG.
pub fn random_token(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// Creates the admin token if this installation has none. Returns the token
/// when it was created now (to be shown once), `None` if one existed.
pub async fn bootstrap_admin_token(store: &Store) -> Result<Option<String>, ApiError> {
    if store.get_meta(ADMIN_DIGEST_META).await?.is_some() {
        return Ok(None);
    }
    let token = format!("{ADMIN_TOKEN_PREFIX}{}", random_token(40));
    let created = store
        .set_meta_if_absent(ADMIN_DIGEST_META, &sha256_hex(&token))
        .await?;
    Ok(created.then_some(token))
}

pub(crate) fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::Unauthenticated(
                "no credentials: send `Authorization: Bearer <admin token or API key>`".into(),
            )
        })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("the Authorization header is not ASCII".into()))?;
    value.strip_prefix("Bearer ").map(str::trim).ok_or_else(|| {
        ApiError::Unauthenticated("use the Bearer scheme: `Authorization: Bearer <token>`".into())
    })
}

/// Resolves the request's bearer token to a caller.
pub async fn authenticate(store: &Store, headers: &HeaderMap) -> Result<Caller, ApiError> {
    authenticate_token(store, bearer(headers)?).await
}

/// Resolves an admin token, API key or plane credential to a caller.
pub async fn authenticate_token(store: &Store, token: &str) -> Result<Caller, ApiError> {
    let invalid = || ApiError::Unauthenticated("invalid, expired or revoked token".into());
    if token.starts_with(ADMIN_TOKEN_PREFIX) {
        let stored = store
            .get_meta(ADMIN_DIGEST_META)
            .await?
            .ok_or_else(invalid)?;
        if digests_equal(&stored, &sha256_hex(token)) {
            return Ok(Caller {
                role: Role::ProviderAdmin,
                tenant: None,
                actor: "admin".into(),
                plane: None,
                may_infer: false,
            });
        }
        return Err(invalid());
    }
    if let Some(plane) = Plane::of_token(token) {
        return authenticate_plane(store, plane, token).await;
    }
    let (id, _secret) = split_key_token(token).ok_or_else(invalid)?;
    let key = store
        .get(<crate::kinds::Key as crate::kinds::Resource>::KIND, id)
        .await?
        .ok_or_else(invalid)?;
    let stored = key
        .body
        .get("digest")
        .and_then(|d| d.as_str())
        .unwrap_or_default();
    if !digests_equal(stored, &sha256_hex(token)) {
        return Err(invalid());
    }
    let record: crate::kinds::KeyRecord = serde_json::from_value(key.body.clone())
        .map_err(|e| ApiError::Internal(format!("key {id}: {e}")))?;
    if record.status.revoked_at.is_some() {
        return Err(invalid());
    }
    if let Some(expiry) = record.spec.expires_at {
        if expiry <= OffsetDateTime::now_utc() {
            return Err(invalid());
        }
    }
    let tenant = key
        .tenant
        .ok_or_else(|| ApiError::Internal(format!("key {id} has no tenant")))?;
    Ok(Caller {
        role: Role::from_scopes(&record.spec.scopes),
        tenant: Some(tenant),
        actor: id.to_string(),
        plane: None,
        may_infer: record
            .spec
            .scopes
            .iter()
            .any(|s| matches!(s, Scope::Inference | Scope::Admin)),
    })
}

/// Resolves a plane credential (`atrn_…`, `atrg_…`) to its caller.
async fn authenticate_plane(store: &Store, plane: Plane, token: &str) -> Result<Caller, ApiError> {
    let invalid = || ApiError::Unauthenticated("invalid or revoked credential".into());
    let (id, _secret) = split_token(plane.token_prefix(), token).ok_or_else(invalid)?;
    let object = store
        .get(
            <crate::kinds::Credential as crate::kinds::Resource>::KIND,
            id,
        )
        .await?
        .ok_or_else(invalid)?;
    let record: crate::kinds::CredentialRecord = serde_json::from_value(object.body)
        .map_err(|e| ApiError::Internal(format!("credential {id}: {e}")))?;
    if !digests_equal(&record.digest, &sha256_hex(token))
        || record.status.revoked_at.is_some()
        || record.spec.plane != plane
    {
        return Err(invalid());
    }
    Ok(Caller {
        role: match plane {
            Plane::Node => Role::Node,
            Plane::Gateway => Role::Gateway,
        },
        tenant: None,
        actor: format!("{}:{}", plane.as_str(), record.spec.name),
        plane: Some(record.spec),
        may_infer: false,
    })
}

pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}
