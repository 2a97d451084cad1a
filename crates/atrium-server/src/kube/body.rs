//! What a request to a tenant cluster sends: its media type, its body as
//! the JSON the API works on (JSON itself, or the protobuf kubectl's
//! generators send), and whether it asks for a dry run.

use atrium_kube::KubeError;
use axum::http::{header, Method};
use serde_json::Value;

use super::Request;

/// The request's media type, without parameters.
pub(super) fn content_type(req: &Request) -> String {
    req.headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The body as JSON. Protobuf (client-go's first choice for built-in
/// types, and kubectl's only one for what its generators make) is read for
/// the kinds `atrium_kube::protobuf` knows; any other gets 415, naming JSON.
pub(super) fn body(req: &Request) -> Result<Value, KubeError> {
    let media = content_type(req);
    if media == "application/vnd.kubernetes.protobuf" {
        if let Some(object) = atrium_kube::protobuf::object(&req.body)? {
            return Ok(object);
        }
    }
    if !(media.is_empty() || media.ends_with("json")) {
        return Err(KubeError::unsupported_media_type(&media));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| KubeError::bad_request(format!("the body is not JSON: {e}")))
}

/// `dryRun=All` as a parameter, or (on deletes) in the `DeleteOptions`
/// body kubectl sends.
pub(super) fn dry_run(req: &Request) -> bool {
    let in_body = || {
        req.method == Method::DELETE
            && serde_json::from_slice::<Value>(&req.body).is_ok_and(|o| {
                o.get("dryRun")
                    .and_then(Value::as_array)
                    .is_some_and(|d| d.iter().any(|v| v == "All"))
            })
    };
    req.param("dryRun") == Some("All") || in_body()
}
