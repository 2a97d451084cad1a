//! The tenant APIs the control plane serves — `/v1/files` and
//! `/v1/batches` (the Batch API), `/v1/collections` (vector search),
//! `/v1/databases` (PostgreSQL databases) — as
//! tenants call them through a gateway: passed on with the tenant's own
//! key (the control plane decides what it may do). Only these APIs' own
//! shapes pass, checked segment by segment: a tenant's path never becomes
//! another control-plane route (no `..`, no encoded slash, no other verb).

use atrium_client::ControlPlane;

use crate::http1::Method;
use crate::refusal::Refusal;
use crate::server::{Request, Response};

/// Longest query passed on.
const MAX_QUERY: usize = 512;

/// The routes: their metrics label, the methods each takes, and those as
/// an `Allow` header says them.
const ROUTES: [(&str, &[Method], &str); 17] = [
    ("/v1/files", &[Method::Get, Method::Post], "GET, POST"),
    (
        "/v1/files/{id}",
        &[Method::Get, Method::Delete],
        "GET, DELETE",
    ),
    ("/v1/files/{id}/content", &[Method::Get], "GET"),
    ("/v1/batches", &[Method::Get, Method::Post], "GET, POST"),
    ("/v1/batches/{id}", &[Method::Get], "GET"),
    ("/v1/batches/{id}/cancel", &[Method::Post], "POST"),
    ("/v1/collections", &[Method::Get, Method::Post], "GET, POST"),
    (
        "/v1/collections/{name}",
        &[Method::Get, Method::Delete],
        "GET, DELETE",
    ),
    ("/v1/collections/{name}/points", &[Method::Post], "POST"),
    (
        "/v1/collections/{name}/points/delete",
        &[Method::Post],
        "POST",
    ),
    (
        "/v1/collections/{name}/points/search",
        &[Method::Post],
        "POST",
    ),
    (
        "/v1/collections/{name}/points/scroll",
        &[Method::Post],
        "POST",
    ),
    (
        "/v1/collections/{name}/points/count",
        &[Method::Post],
        "POST",
    ),
    ("/v1/collections/{name}/points/{id}", &[Method::Get], "GET"),
    ("/v1/databases", &[Method::Get, Method::Post], "GET, POST"),
    (
        "/v1/databases/{name}",
        &[Method::Get, Method::Delete],
        "GET, DELETE",
    ),
    ("/v1/databases/{name}/rotate", &[Method::Post], "POST"),
];

/// Whether `path` is one of these routes; its metrics label when it is.
pub fn route_of(path: &str) -> Option<&'static str> {
    let rest = path.strip_prefix("/v1/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    let label = match segments.as_slice() {
        ["files"] => "/v1/files",
        ["files", _] => "/v1/files/{id}",
        ["files", _, "content"] => "/v1/files/{id}/content",
        ["batches"] => "/v1/batches",
        ["batches", _] => "/v1/batches/{id}",
        ["batches", _, "cancel"] => "/v1/batches/{id}/cancel",
        ["collections"] => "/v1/collections",
        ["collections", _] => "/v1/collections/{name}",
        ["collections", _, "points"] => "/v1/collections/{name}/points",
        ["collections", _, "points", "delete"] => "/v1/collections/{name}/points/delete",
        ["collections", _, "points", "search"] => "/v1/collections/{name}/points/search",
        ["collections", _, "points", "scroll"] => "/v1/collections/{name}/points/scroll",
        ["collections", _, "points", "count"] => "/v1/collections/{name}/points/count",
        ["collections", _, "points", _] => "/v1/collections/{name}/points/{id}",
        ["databases"] => "/v1/databases",
        ["databases", _] => "/v1/databases/{name}",
        ["databases", _, "rotate"] => "/v1/databases/{name}/rotate",
        _ => return None,
    };
    Some(label)
}

/// An id as the control plane makes them: letters, digits, `-` and `_`.
fn plain_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A query of plain `name=value` pairs, percent-encoding allowed.
fn plain_query(q: &str) -> bool {
    q.len() <= MAX_QUERY
        && q.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~=&%".contains(&b))
}

/// Checks `request` against `route`'s shape and passes it on.
pub async fn forward(
    cp: &ControlPlane,
    route: &'static str,
    request: Request,
) -> Result<Response, Refusal> {
    let head = &request.head;
    if let Some((_, methods, allow)) = ROUTES.iter().find(|r| r.0 == route) {
        if !methods.contains(&head.method) {
            return Err(Refusal::MethodNotAllowed { allow });
        }
    }
    // The id or name, and a point's id: plain; `claim` is the runners'.
    let ids_plain = head
        .path
        .split('/')
        .enumerate()
        .filter(|(i, _)| *i == 3 || (*i == 5 && route.ends_with("{id}")))
        .all(|(_, id)| plain_id(id) && id != "claim");
    if !ids_plain {
        return Err(Refusal::NoRoute);
    }
    let authorization = head.authorization.as_deref().ok_or(Refusal::MissingKey)?;
    let mut target = head.path.clone();
    if let Some(q) = head.query.as_deref().filter(|q| !q.is_empty()) {
        if !plain_query(q) {
            return Err(Refusal::BadRequest(
                "the query may hold only name=value pairs of URL-safe characters".into(),
            ));
        }
        target.push('?');
        target.push_str(q);
    }
    let method = match head.method {
        Method::Post => reqwest::Method::POST,
        Method::Delete => reqwest::Method::DELETE,
        _ => reqwest::Method::GET,
    };
    let (status, content_type, body) = cp
        .forward(
            method,
            &target,
            authorization,
            head.content_type.as_deref(),
            request.body,
        )
        .await
        .map_err(|e| Refusal::Upstream(format!("the control plane is unreachable: {e}")))?;
    Ok(Response::new(
        status,
        content_type.as_deref().unwrap_or("application/json"),
        body,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_apis_own_shapes_are_routes() {
        assert_eq!(route_of("/v1/files"), Some("/v1/files"));
        assert_eq!(
            route_of("/v1/files/file-abc/content"),
            Some("/v1/files/{id}/content")
        );
        assert_eq!(
            route_of("/v1/batches/batch_x/cancel"),
            Some("/v1/batches/{id}/cancel")
        );
        assert_eq!(
            route_of("/v1/collections/docs/points/search"),
            Some("/v1/collections/{name}/points/search")
        );
        assert_eq!(
            route_of("/v1/collections/docs/points/42"),
            Some("/v1/collections/{name}/points/{id}")
        );
        assert_eq!(
            route_of("/v1/databases/app/rotate"),
            Some("/v1/databases/{name}/rotate")
        );
        for path in [
            "/v1/keys",
            "/v1/files/",
            "/v1/files/a/b",
            "/v1/batches/x/progress",
            "/v1/batches/x/results",
            "/v1/files/../keys",
            "/v1/collections/a/points/b/c",
            "/v1/collections/a/b",
            "/v1/collections/../keys/points",
            "/v1/databases/app/credentials",
            "/v1/databases/app/rotate/x",
        ] {
            let shaped = route_of(path).is_some();
            let id_ok = path.split('/').nth(3).is_none_or(plain_id);
            assert!(!shaped || !id_ok, "{path} would pass");
        }
    }

    #[test]
    fn ids_and_queries_are_plain() {
        assert!(plain_id("file-0123456789abcdef"));
        assert!(plain_id("batch_0123456789abcdef"));
        for bad in ["", "..", "a%2Fb", "a.b", &"x".repeat(65)] {
            assert!(!plain_id(bad), "{bad}");
        }
        assert!(plain_query("limit=2&after=batch_abc&order=asc"));
        assert!(!plain_query("a=b/../c"));
        assert!(!plain_query("a=b#c"));
        assert!(!plain_query(&"a".repeat(MAX_QUERY + 1)));
    }
}
