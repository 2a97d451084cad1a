//! Credentials of the runtime and data planes: the provider issues a
//! one-time join token for a node or a gateway; the node's agent (or the
//! gateway) exchanges it for a credential that reaches only its node's
//! work (or its site's routing and usage); the credential can be rotated
//! by its holder or the provider and revoked by the provider. What each
//! credential may do is decided where every caller's is: `kinds::permits`
//! and `kinds::plane_sees`.

use atrium_api::{
    CreatedJoinToken, CredentialStatus, IssuedCredential, JoinRequest, JoinTokenRequest,
    JoinTokenStatus,
};
use atrium_core::plane::{split_token, CredentialSpec, JoinTokenSpec, Plane, JOIN_TOKEN_PREFIX};
use atrium_store::{Object, TenantFilter, Write};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use time::OffsetDateTime;

use crate::auth::{bearer, now_rfc3339, random_token, sha256_hex, Caller, Role};
use crate::crud::{audit, new_id, require, resolve, view, write, ObjectParams};
use crate::error::ApiError;
use crate::extract::{JsonBody, Params};
use crate::kinds::{
    site_exists, Access, Credential, CredentialRecord, Gateway, JoinToken, JoinTokenRecord, Kind,
    Resource,
};
use crate::{AppState, RequestId};

/// How long a join token waits to be used, unless its issuer says.
const DEFAULT_JOIN_TTL_SECS: u64 = 3600;
const MAX_JOIN_TTL_SECS: u64 = 7 * 86_400;

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// `POST /v1/join-tokens`: the provider lets one node or gateway join.
pub async fn create_join_token(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    JsonBody(req): JsonBody<JoinTokenRequest>,
) -> Result<(StatusCode, Json<CreatedJoinToken>), ApiError> {
    require::<JoinToken>(&caller, Access::Write)?;
    let ttl = req.ttl_seconds.unwrap_or(DEFAULT_JOIN_TTL_SECS);
    if !(1..=MAX_JOIN_TTL_SECS).contains(&ttl) {
        return Err(ApiError::field(
            "ttl_seconds",
            format!("must be 1 to {MAX_JOIN_TTL_SECS} (a week)"),
        ));
    }
    let expires_at = OffsetDateTime::now_utc() + time::Duration::seconds(ttl as i64);
    let spec = JoinTokenSpec {
        plane: req.plane,
        name: req.name,
        site: req.site,
        expires_at,
        uses: req.uses.unwrap_or(1),
    };
    JoinToken::validate(&spec).map_err(ApiError::InvalidFields)?;
    site_exists(&state, "site", &spec.site).await?;
    let id = new_id(JoinToken::ID_PREFIX);
    let secret = format!("{JOIN_TOKEN_PREFIX}{id}_{}", random_token(40));
    let record = JoinTokenRecord {
        spec,
        status: JoinTokenStatus::default(),
        digest: sha256_hex(&secret),
    };
    let created = write(
        &state,
        Write::Create {
            kind: JoinToken::KIND.into(),
            id: id.clone(),
            tenant: None,
            name: id,
            body: serde_json::to_value(&record).map_err(internal)?,
        },
        None,
        audit(&caller, &rid, "join_token.create".into()),
    )
    .await?;
    let join_token = serde_json::from_value(view(&created)).map_err(internal)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedJoinToken { join_token, secret }),
    ))
}

/// `POST /v1/join` with `Authorization: Bearer atrj_…`: exchanges a join
/// token for the plane's credential, as many times as it admits. A named
/// token joining again under a name that has a credential replaces its
/// secret (a node that lost its credential, re-provisioned); a token
/// without a name joins only names that have none.
pub async fn join(
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<IssuedCredential>), ApiError> {
    let refused = || {
        ApiError::Unauthenticated(
            "invalid, expired or used-up join token: ask the provider for a new one \
             (atrium node join-token / atrium gateway join-token)"
                .into(),
        )
    };
    let asked: JoinRequest = if body.iter().all(u8::is_ascii_whitespace) {
        JoinRequest::default()
    } else {
        crate::extract::parse_json(&body)?
    };
    let token = bearer(&headers)?;
    let (id, _) = split_token(JOIN_TOKEN_PREFIX, token).ok_or_else(refused)?;
    // A token of several uses may be spent by joins racing each other:
    // each takes one use at the revision it read, and a loser reads again.
    for _ in 0..8 {
        let object = state
            .store
            .get(JoinToken::KIND, id)
            .await?
            .ok_or_else(refused)?;
        let mut record: JoinTokenRecord =
            serde_json::from_value(object.body.clone()).map_err(internal)?;
        let uses = usize::try_from(record.spec.uses).unwrap_or(1).max(1);
        let spent = record
            .status
            .joined
            .len()
            .max(usize::from(record.status.used_at.is_some()));
        let fresh = spent < uses
            && record.spec.expires_at > OffsetDateTime::now_utc()
            && crate::auth::digests_equal(&record.digest, &sha256_hex(token));
        if !fresh {
            return Err(refused());
        }
        let name = joiner_name(&record.spec, asked.name.as_deref())?;
        let spec = CredentialSpec {
            plane: record.spec.plane,
            name: name.clone(),
            site: record.spec.site.clone(),
        };
        let existing = state
            .store
            .list_all(Credential::KIND, &TenantFilter::All)
            .await?
            .into_iter()
            .find(|c| {
                serde_json::from_value::<CredentialRecord>(c.body.clone())
                    .is_ok_and(|r| r.spec.plane == spec.plane && r.spec.name == spec.name)
            });
        if existing.is_some() && record.spec.name.is_empty() {
            return Err(ApiError::Conflict {
                code: "already_joined",
                message: format!(
                    "a {} named {name:?} has joined already; a token naming it re-provisions it",
                    spec.plane.as_str()
                ),
                details: serde_json::Value::Null,
            });
        }
        let as_plane = Caller {
            role: match spec.plane {
                atrium_core::plane::Plane::Node => Role::Node,
                atrium_core::plane::Plane::Gateway => Role::Gateway,
            },
            tenant: None,
            actor: format!("{}:{}", spec.plane.as_str(), spec.name),
            plane: Some(spec.clone()),
            may_infer: false,
        };
        // Used first, at the revision read: of two joins racing for the
        // last use, exactly one gets past this write.
        record.status.used_at = Some(now_rfc3339());
        record.status.joined.push(name);
        let used = write(
            &state,
            Write::Update {
                kind: JoinToken::KIND.into(),
                id: object.id.clone(),
                body: serde_json::to_value(&record).map_err(internal)?,
                if_revision: Some(object.revision),
            },
            None,
            audit(&as_plane, &rid, "join_token.use".into()),
        )
        .await;
        match used {
            Ok(_) => {}
            Err(ApiError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
        let issued = issue(&state, &as_plane, &rid, spec, existing, "credential.join").await?;
        return Ok((StatusCode::CREATED, Json(issued)));
    }
    Err(refused())
}

/// The name a join takes: the token's, or — for a token without one —
/// the joiner's, which must be a valid name.
fn joiner_name(token: &JoinTokenSpec, asked: Option<&str>) -> Result<String, ApiError> {
    match (token.name.as_str(), asked) {
        ("", None) => Err(ApiError::field(
            "name",
            "this join token names no node: say which one is joining (--name)",
        )),
        ("", Some(name)) => {
            atrium_core::name::validate_name(name).map_err(|e| ApiError::field("name", e))?;
            Ok(name.to_string())
        }
        (named, Some(asked)) if named != asked => Err(ApiError::field(
            "name",
            format!("this join token is for {named:?}, not {asked:?}"),
        )),
        (named, _) => Ok(named.to_string()),
    }
}

/// Writes a credential with a new secret: a new object, or `existing`
/// with its secret replaced (and any revocation lifted).
async fn issue(
    state: &AppState,
    caller: &Caller,
    rid: &RequestId,
    spec: CredentialSpec,
    existing: Option<Object>,
    action: &str,
) -> Result<IssuedCredential, ApiError> {
    let id = existing
        .as_ref()
        .map(|o| o.id.clone())
        .unwrap_or_else(|| new_id(Credential::ID_PREFIX));
    let secret = format!("{}{id}_{}", spec.plane.token_prefix(), random_token(40));
    let record = CredentialRecord {
        spec,
        status: CredentialStatus {
            issued_at: Some(now_rfc3339()),
            revoked_at: None,
        },
        digest: sha256_hex(&secret),
    };
    let body = serde_json::to_value(&record).map_err(internal)?;
    let w = match existing {
        Some(o) => Write::Update {
            kind: Credential::KIND.into(),
            id: o.id,
            body,
            if_revision: Some(o.revision),
        },
        None => Write::Create {
            kind: Credential::KIND.into(),
            id: id.clone(),
            tenant: None,
            name: id,
            body,
        },
    };
    let written = write(state, w, None, audit(caller, rid, action.into())).await?;
    let credential = serde_json::from_value(view(&written)).map_err(internal)?;
    Ok(IssuedCredential { credential, secret })
}

/// `POST /v1/credentials/{id}/rotate`: a new secret for the credential,
/// by its holder or the provider; the old one stops working at once.
pub async fn rotate_credential(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(ident): Path<String>,
) -> Result<Json<IssuedCredential>, ApiError> {
    let object = state
        .store
        .get(Credential::KIND, &ident)
        .await?
        .ok_or_else(|| ApiError::not_found(Credential::KIND, &ident))?;
    let record: CredentialRecord = serde_json::from_value(object.body.clone()).map_err(internal)?;
    let holder = caller.plane.as_ref() == Some(&record.spec);
    if caller.role != Role::ProviderAdmin && !holder {
        return Err(ApiError::not_found(Credential::KIND, &ident));
    }
    if record.status.revoked_at.is_some() {
        return Err(ApiError::Conflict {
            code: "revoked",
            message: format!("credential {ident} is revoked; issue a join token instead"),
            details: serde_json::Value::Null,
        });
    }
    let issued = issue(
        &state,
        &caller,
        &rid,
        record.spec,
        Some(object),
        "credential.rotate",
    )
    .await?;
    Ok(Json(issued))
}

/// `POST /v1/credentials/{id}/revoke`: the provider cuts a node or
/// gateway off; its credential authenticates nothing from now on.
pub async fn revoke_credential(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(ident): Path<String>,
    Params(params): Params<ObjectParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require::<Credential>(&caller, Access::Write)?;
    let object = resolve::<Credential>(&state, &caller, &ident, params.tenant.as_deref()).await?;
    let mut record: CredentialRecord =
        serde_json::from_value(object.body.clone()).map_err(internal)?;
    record.status.revoked_at.get_or_insert_with(now_rfc3339);
    let updated = write(
        &state,
        Write::Update {
            kind: Credential::KIND.into(),
            id: object.id,
            body: serde_json::to_value(&record).map_err(internal)?,
            if_revision: None,
        },
        None,
        audit(&caller, &rid, "credential.revoke".into()),
    )
    .await?;
    // A revoked gateway is nobody's peer: its record goes, so the other
    // sites stop probing it and forwarding to it now, not when its
    // certificate expires.
    if record.spec.plane == Plane::Gateway {
        let own = state
            .store
            .get_by_name(Gateway::KIND, None, &record.spec.name)
            .await?;
        if let Some(own) = own {
            write(
                &state,
                Write::Delete {
                    kind: Gateway::KIND.into(),
                    id: own.id,
                },
                None,
                audit(&caller, &rid, "gateway.delete".into()),
            )
            .await?;
        }
    }
    Ok(Json(view(&updated)))
}

/// `POST /v1/site-certificates`: a gateway's certificate for its site's
/// peer link, for the public key it sent. Gateway credentials only: the
/// site in the certificate is the credential's.
pub async fn site_certificate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<atrium_api::SiteCertificateRequest>,
) -> Result<Json<atrium_api::SiteCertificate>, ApiError> {
    let Some(site) = caller.gateway_site() else {
        return Err(ApiError::Forbidden(
            "site certificates are issued to gateways only, with their site credential".into(),
        ));
    };
    let certificate_pem = state
        .authority
        .issue_site(site, &request.public_key)
        .map_err(|why| ApiError::field("public_key", why))?;
    Ok(Json(atrium_api::SiteCertificate {
        certificate_pem,
        ca_pem: state.authority.ca_pem.clone(),
        valid_for_s: crate::tls::SITE_CERTIFICATE_LIFETIME.as_secs(),
    }))
}
