//! Request extractors whose rejections are [`ApiError`]s, so a bad body or
//! query gets the same error shape as everything else, with the field named.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::AppState;

/// A JSON body: `application/json`, at most the configured size, parsed
/// with the path of the failing field in the error.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::UnsupportedMediaType(content_type));
        }
        let limit = state.body_limit;
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| ApiError::PayloadTooLarge { limit })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses JSON, naming the failing field: syntax errors become
/// `invalid_json` with the position, type and value errors become
/// `invalid_request` with the field's dotted path.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would accept a struct written as an array; no client means that.
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        None => {
            return Err(ApiError::MalformedJson(
                "the body is empty; send a JSON object".into(),
            ))
        }
        Some(_) => return Err(ApiError::field("body", "must be a JSON object")),
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() {
            let field = if path == "." {
                "body".to_string()
            } else {
                path
            };
            ApiError::field(&field, strip_position(&inner.to_string()))
        } else {
            ApiError::MalformedJson(inner.to_string())
        }
    })?;
    de.end()
        .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    Ok(value)
}

/// serde_json appends " at line L column C" to data errors; the field path
/// already says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Query parameters, with unknown or malformed ones refused by name.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(query)
            .map(Params)
            .map_err(|e| ApiError::InvalidQuery {
                name: "query".into(),
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atrium_core::deployment::DeploymentSpec;

    fn fields(err: ApiError) -> Vec<(String, String)> {
        match err {
            ApiError::InvalidFields(f) => f.0.into_iter().map(|e| (e.field, e.message)).collect(),
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn names_the_field_of_a_bad_quantity() {
        let body = br#"{"model":"m","engine":"embedded","resources":{"cpu":"2 cores","memory":"1Gi"},"replicas":{"min":1,"max":1}}"#;
        let f = fields(parse_json::<DeploymentSpec>(body).err().unwrap());
        assert_eq!(f[0].0, "resources.cpu");
        assert!(
            f[0].1.contains("invalid CPU quantity \"2 cores\""),
            "{}",
            f[0].1
        );
    }

    #[test]
    fn names_unknown_fields_and_rejects_syntax_errors() {
        let body = br#"{"model":"m","engine":"embedded","resources":{"cpu":"1","memory":"1Gi","colour":"red"},"replicas":{"min":1,"max":1}}"#;
        let f = fields(parse_json::<DeploymentSpec>(body).err().unwrap());
        assert_eq!(f[0].0, "resources.colour");
        assert!(f[0].1.contains("unknown field `colour`"), "{}", f[0].1);
        assert!(matches!(
            parse_json::<DeploymentSpec>(b"{\"model\":"),
            Err(ApiError::MalformedJson(_))
        ));
        assert!(matches!(
            parse_json::<DeploymentSpec>(b"{} {}"),
            Err(ApiError::MalformedJson(_)) | Err(ApiError::InvalidFields(_))
        ));
    }
}
