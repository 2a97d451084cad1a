//! Service account tokens (`kubectl create token SA`, the TokenRequest
//! API): `atrium-sa.<claims>.<signature>`, the claims naming the cluster,
//! the account's namespace, name and uid, and an expiry; signed with
//! HMAC-SHA256 under a key derived from the control plane's master key.
//! A token opens only its own cluster, only until it expires, and only
//! while the account it names still exists with the same uid (deleting
//! the account revokes every token it had).

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use atrium_kube::KubeError;
use axum::http::StatusCode;

use super::objects::{existing, now_unix, Call};
use super::KubeResponse;

pub const PREFIX: &str = "atrium-sa.";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// Token lifetimes a request may ask for, as upstream bounds them.
const MIN_SECONDS: i64 = 600;
const MAX_SECONDS: i64 = 48 * 3600;
const DEFAULT_SECONDS: i64 = 3600;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "c")]
    pub cluster: String,
    #[serde(rename = "n")]
    pub namespace: String,
    #[serde(rename = "s")]
    pub name: String,
    #[serde(rename = "u")]
    pub uid: String,
    /// Expiry, Unix seconds.
    #[serde(rename = "e")]
    pub expires: i64,
}

pub fn issue(key: &ring::hmac::Key, claims: &Claims) -> String {
    let body = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
    let tag = ring::hmac::sign(key, body.as_bytes());
    format!("{PREFIX}{body}.{}", B64.encode(tag.as_ref()))
}

/// The claims of a well-signed, unexpired token; nothing else is said of
/// a bad one.
pub fn verify(key: &ring::hmac::Key, token: &str, now: i64) -> Option<Claims> {
    let (body, tag) = token.strip_prefix(PREFIX)?.split_once('.')?;
    let tag = B64.decode(tag).ok()?;
    ring::hmac::verify(key, body.as_bytes(), &tag).ok()?;
    let claims: Claims = serde_json::from_slice(&B64.decode(body).ok()?).ok()?;
    (claims.expires > now).then_some(claims)
}

/// `POST …/serviceaccounts/{name}/token`: a token for the account.
pub(super) async fn token_request(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let name = call.name();
    let account = existing(state, scope, at, name).await?;
    // kubectl sends it as protobuf; other clients as JSON.
    let (audiences, asked) = if req.body.is_empty() {
        (Vec::new(), None)
    } else if super::body::content_type(req) == "application/vnd.kubernetes.protobuf" {
        atrium_kube::protobuf::token_request_spec(&req.body)?
    } else {
        let ask: Value = serde_json::from_slice(&req.body)
            .map_err(|e| KubeError::bad_request(format!("the TokenRequest is not JSON: {e}")))?;
        let audiences = ask
            .pointer("/spec/audiences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let seconds = match ask.pointer("/spec/expirationSeconds") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_i64().unwrap_or(-1)),
        };
        (audiences, seconds)
    };
    let seconds = match asked {
        None => DEFAULT_SECONDS,
        Some(v) => Some(v)
            .filter(|s| (MIN_SECONDS..=MAX_SECONDS).contains(s))
            .ok_or_else(|| {
                KubeError::invalid(
                    "TokenRequest",
                    name,
                    format!("spec.expirationSeconds: must be from {MIN_SECONDS} to {MAX_SECONDS}"),
                )
            })?,
    };
    let expires = now_unix().saturating_add(seconds);
    let claims = Claims {
        cluster: scope.id.clone(),
        namespace: at.namespace.clone().unwrap_or_default(),
        name: name.to_string(),
        uid: account.body["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        expires,
    };
    let token = issue(&state.sealer.token_key()?, &claims);
    let expiry = time::OffsetDateTime::from_unix_timestamp(expires)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    Ok(KubeResponse::Json(
        StatusCode::CREATED,
        json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": name, "namespace": claims.namespace},
            "spec": {"expirationSeconds": seconds, "audiences": audiences},
            "status": {"token": token, "expirationTimestamp": expiry},
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[byte; 32])
    }

    #[test]
    fn a_token_opens_only_unchanged_unexpired_and_under_its_key() {
        let claims = Claims {
            cluster: "clu_1".into(),
            namespace: "demo".into(),
            name: "bot".into(),
            uid: "u-1".into(),
            expires: 2_000,
        };
        let token = issue(&key(1), &claims);
        assert_eq!(verify(&key(1), &token, 1_000), Some(claims.clone()));
        assert_eq!(verify(&key(1), &token, 2_000), None, "expired");
        assert_eq!(verify(&key(2), &token, 1_000), None, "another key");
        // A claim rewritten to another account or cluster breaks the signature.
        let (body, tag) = token.strip_prefix(PREFIX).unwrap().split_once('.').unwrap();
        let mut forged: Value = serde_json::from_slice(&B64.decode(body).unwrap()).unwrap();
        forged["c"] = json!("clu_2");
        let forged = format!("{PREFIX}{}.{tag}", B64.encode(forged.to_string()));
        assert_eq!(verify(&key(1), &forged, 1_000), None);
        for junk in ["", "atrium-sa.", "atrium-sa.x.y", "atrium-sa..", "Bearer x"] {
            assert_eq!(verify(&key(1), junk, 1_000), None, "{junk}");
        }
    }
}
