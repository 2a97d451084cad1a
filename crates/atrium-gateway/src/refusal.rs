//! Every answer the gateway gives in place of an upstream's: one enum,
//! rendered in OpenAI's error shape in one place, so SDKs raise their usual
//! exceptions and each refusal's status, type and code are decided once.

use serde::Serialize;

use crate::limits;
use crate::server::Response;

/// Why a request was not (or not fully) served.
#[derive(Debug)]
pub enum Refusal {
    /// A path the gateway does not serve.
    NoRoute,
    MethodNotAllowed {
        allow: &'static str,
    },
    /// The HTTP layer refused the request itself (too large, malformed).
    Protocol {
        status: u16,
        message: String,
    },
    MissingKey,
    InvalidKey(String),
    /// `/metrics` without the provider's metrics token.
    MetricsToken,
    NoInferenceScope,
    BadRequest(String),
    /// Not the caller's, or not at all: the two look the same.
    ModelNotFound(String),
    RateLimited {
        exceeded: limits::Exceeded,
        who: String,
    },
    /// The route table has not had its first snapshot.
    NotReady,
    NoReadyReplica(String),
    /// No site the tenant's residency (and the deployment's site list)
    /// allows can serve it now; it is never served elsewhere instead.
    NoCompliantSite(String),
    /// The peer link refused a request (not from the site it names).
    PeerForbidden,
    /// An external upstream's URL the gateway cannot use.
    UpstreamUnusable(String),
    /// An external upstream the egress policy refuses.
    UpstreamNotAllowed(String),
    /// A replica or upstream failed mid-request.
    Upstream(String),
    Internal(&'static str),
}

#[derive(Serialize)]
struct OpenAiError<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
struct ErrorFields<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

const INVALID: &str = "invalid_request_error";
const SERVER: &str = "server_error";

impl Refusal {
    /// Status, OpenAI error type, code, parameter at fault.
    fn shape(
        &self,
    ) -> (
        u16,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    ) {
        match self {
            Refusal::NoRoute | Refusal::BadRequest(_) => (
                if matches!(self, Refusal::NoRoute) {
                    404
                } else {
                    400
                },
                INVALID,
                None,
                None,
            ),
            Refusal::MethodNotAllowed { .. } => (405, INVALID, None, None),
            Refusal::Protocol { status, .. } => (*status, INVALID, None, None),
            Refusal::MissingKey | Refusal::InvalidKey(_) | Refusal::MetricsToken => {
                (401, INVALID, Some("invalid_api_key"), None)
            }
            Refusal::NoInferenceScope => (403, INVALID, Some("insufficient_scope"), None),
            Refusal::ModelNotFound(_) => (404, INVALID, Some("model_not_found"), None),
            Refusal::RateLimited { exceeded, .. } => (
                429,
                exceeded.kind.openai_type(),
                Some("rate_limit_exceeded"),
                Some(exceeded.kind.field()),
            ),
            Refusal::NotReady => (503, SERVER, None, None),
            Refusal::NoReadyReplica(_) => (503, SERVER, Some("no_ready_replica"), None),
            Refusal::NoCompliantSite(_) => (503, SERVER, Some("no_compliant_site"), None),
            Refusal::PeerForbidden => (403, INVALID, Some("peer_forbidden"), None),
            Refusal::UpstreamUnusable(_) => (502, SERVER, Some("upstream_unusable"), None),
            Refusal::UpstreamNotAllowed(_) => (403, INVALID, Some("upstream_not_allowed"), None),
            Refusal::Upstream(_) => (502, SERVER, None, None),
            Refusal::Internal(_) => (500, SERVER, None, None),
        }
    }

    fn message(&self) -> String {
        match self {
            Refusal::NoRoute => "no such route".into(),
            Refusal::MethodNotAllowed { allow } => format!("method not allowed here: use {allow}"),
            Refusal::MissingKey => "Missing API key: send `Authorization: Bearer <key>`.".into(),
            Refusal::MetricsToken => "/metrics needs the provider's metrics token: \
                `Authorization: Bearer <token>` (in <data-dir>/gateway/metrics.token unless \
                --metrics-token set it)"
                .into(),
            Refusal::NoInferenceScope => "this key has no inference scope".into(),
            Refusal::ModelNotFound(model) => {
                format!("The model `{model}` does not exist or you do not have access to it.")
            }
            Refusal::RateLimited { exceeded: e, who } => rate_limit_message(e, who),
            Refusal::NotReady => "not yet synchronised with the control plane".into(),
            Refusal::PeerForbidden => "the peer link takes requests only from the site its \
                certificate names (x-atrium-ingress-site)"
                .into(),
            Refusal::Protocol { message, .. }
            | Refusal::InvalidKey(message)
            | Refusal::BadRequest(message)
            | Refusal::NoReadyReplica(message)
            | Refusal::NoCompliantSite(message)
            | Refusal::UpstreamUnusable(message)
            | Refusal::UpstreamNotAllowed(message)
            | Refusal::Upstream(message) => message.clone(),
            Refusal::Internal(message) => (*message).to_string(),
        }
    }

    pub fn into_response(self) -> Response {
        let (status, kind, code, param) = self.shape();
        let message = self.message();
        let body = OpenAiError {
            error: ErrorFields {
                message: &message,
                kind,
                param,
                code,
            },
        };
        let mut response = Response::json(status, &body);
        match &self {
            Refusal::MethodNotAllowed { allow } => response.header("allow", *allow),
            Refusal::MetricsToken => response.header("www-authenticate", "Bearer"),
            Refusal::RateLimited { exceeded, .. } => {
                response.header("retry-after", exceeded.retry_after_secs().to_string())
            }
            // A replica may be starting still, or back soon.
            Refusal::NoReadyReplica(_) | Refusal::NoCompliantSite(_) => {
                response.header("retry-after", "5")
            }
            _ => {}
        }
        response
    }
}

fn rate_limit_message(e: &limits::Exceeded, who: &str) -> String {
    if e.never_fits() {
        format!(
            "Request too large for the {scope}'s {field} ({limit}): it may use up to {requested} tokens. Lower max_tokens or shorten the prompt.",
            scope = e.scope.word(),
            field = e.kind.field(),
            limit = e.limit,
            requested = e.requested,
        )
    } else {
        format!(
            "Rate limit reached for {scope} {who} on {field}: limit {limit}, used {used}, requested {requested}. Please try again in {secs}s.",
            scope = e.scope.word(),
            field = e.kind.field(),
            limit = e.limit,
            used = e.used,
            requested = e.requested,
            secs = e.retry_after_secs(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_the_openai_shape() {
        let r = Refusal::ModelNotFound("chat".into()).into_response();
        assert_eq!(r.status, 404);
        let crate::server::ResponseBody::Full(body) = &r.body else {
            panic!("a refusal is a full body")
        };
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
        let r = Refusal::MethodNotAllowed { allow: "POST" }.into_response();
        assert_eq!(r.status, 405);
        assert!(r.headers.iter().any(|(n, v)| *n == "allow" && v == "POST"));
    }
}
