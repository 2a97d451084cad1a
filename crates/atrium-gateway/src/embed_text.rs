//! Text in a vector collection's upsert or search, embedded here before
//! the request goes on to the control plane: each point's `text` (when it
//! has no `vector`), or the search's `text`, becomes the vector the
//! collection's `embedding_model` gives it — one of the caller's own
//! deployments, called as the caller, so the embedding is admitted,
//! limited and metered like any request of theirs. A point's text is kept
//! in its payload as `text` unless the payload sets one.
//!
//! The control plane never calls a tenant's model: that traffic belongs to
//! a gateway, which holds the routes, the limits and the meter.

use bytes::Bytes;
use serde_json::{json, Value};

use crate::refusal::Refusal;
use crate::server::{Request, Response};
use crate::Gateway;

/// Longest text embedded, in bytes (MiniLM reads 256 tokens; larger
/// models more).
const MAX_TEXT_BYTES: usize = 32 << 10;

const UPSERT: &str = "/v1/collections/{name}/points";
const SEARCH: &str = "/v1/collections/{name}/points/search";

/// Whether `route` may carry text to embed.
pub fn carries_text(route: &str) -> bool {
    route == UPSERT || route == SEARCH
}

fn bad(message: String) -> Response {
    Refusal::BadRequest(message).into_response()
}

/// Replaces text by vectors in `request`'s body; the response to send
/// instead when that cannot be done (the collection's own 404, a bad
/// text, the embedding call's refusal).
pub async fn embed(g: &Gateway, route: &str, request: &mut Request) -> Result<(), Response> {
    // Most upserts and searches carry vectors: no parse for them.
    if !request.body.windows(6).any(|w| w == b"\"text\"") {
        return Ok(());
    }
    let Ok(mut body) = serde_json::from_slice::<Value>(&request.body) else {
        return Ok(()); // the control plane says what is wrong with it
    };
    // Where text sits: the points' indices, or the search itself.
    let mut texts: Vec<String> = Vec::new();
    let mut at: Vec<Option<usize>> = Vec::new();
    let wanted = |v: &Value, where_: &str| -> Result<Option<String>, Response> {
        match (v.get("text"), v.get("vector")) {
            (None, _) => Ok(None),
            (Some(_), Some(_)) => Err(bad(format!("{where_}: give `vector` or `text`, not both"))),
            (Some(Value::String(t)), None) if !t.is_empty() && t.len() <= MAX_TEXT_BYTES => {
                Ok(Some(t.clone()))
            }
            (Some(_), None) => Err(bad(format!(
                "{where_}: `text` must be a string of 1 to {MAX_TEXT_BYTES} bytes"
            ))),
        }
    };
    if route == UPSERT {
        if let Some(points) = body.get("points").and_then(Value::as_array) {
            for (i, p) in points.iter().enumerate() {
                if let Some(t) = wanted(p, &format!("points[{i}]"))? {
                    texts.push(t);
                    at.push(Some(i));
                }
            }
        }
    } else if let Some(t) = wanted(&body, "search")? {
        texts.push(t);
        at.push(None);
    }
    if texts.is_empty() {
        return Ok(());
    }
    let authorization = request.head.authorization.clone().unwrap_or_default();
    let caller = crate::authenticate(g, request.head.authorization.as_deref())
        .map_err(Refusal::into_response)?;
    let model = embedding_model(g, &request.head.path, &authorization).await?;
    let raw = Bytes::from(
        serde_json::to_vec(&json!({"model": model, "input": texts})).unwrap_or_default(),
    );
    let (status, _, answer) = crate::proxy::run_whole(g, "/v1/embeddings", caller, raw, None).await;
    if status != 200 {
        return Err(Response::new(status, "application/json", answer));
    }
    let vectors = embeddings(&answer, texts.len()).ok_or_else(|| {
        Refusal::Upstream("the embedding deployment answered malformed JSON".into()).into_response()
    })?;
    for ((place, vector), text) in at.into_iter().zip(vectors).zip(texts) {
        let target = match place {
            Some(i) => &mut body["points"][i],
            None => &mut body,
        };
        if let Some(o) = target.as_object_mut() {
            o.remove("text");
            o.insert("vector".into(), vector);
            if place.is_some() {
                let payload = o.entry("payload").or_insert_with(|| json!({}));
                if let Some(p) = payload.as_object_mut() {
                    p.entry("text").or_insert(Value::String(text));
                }
            }
        }
    }
    request.body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    Ok(())
}

/// The collection's `embedding_model`, asked of the control plane with the
/// caller's key (so another tenant's collection is a 404 here too).
async fn embedding_model(g: &Gateway, path: &str, authorization: &str) -> Result<String, Response> {
    let collection: String = path.split('/').take(4).collect::<Vec<_>>().join("/");
    let (status, content_type, body) =
        g.cp.forward(
            reqwest::Method::GET,
            &collection,
            authorization,
            None,
            Bytes::new(),
        )
        .await
        .map_err(|e| {
            Refusal::Upstream(format!("the control plane is unreachable: {e}")).into_response()
        })?;
    if status != 200 {
        return Err(Response::new(
            status,
            content_type.as_deref().unwrap_or("application/json"),
            body,
        ));
    }
    serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|c| c.get("embedding_model")?.as_str().map(str::to_string))
        .ok_or_else(|| {
            bad(
                "this collection has no `embedding_model`: send vectors, or create a collection \
                 that names one of your embedding deployments"
                    .into(),
            )
        })
}

/// The `n` embeddings of an OpenAI embeddings answer, in input order.
fn embeddings(answer: &[u8], n: usize) -> Option<Vec<Value>> {
    let v: Value = serde_json::from_slice(answer).ok()?;
    let mut data: Vec<(u64, Value)> = v
        .get("data")?
        .as_array()?
        .iter()
        .filter_map(|d| Some((d.get("index")?.as_u64()?, d.get("embedding")?.clone())))
        .collect();
    data.sort_by_key(|d| d.0);
    (data.len() == n).then(|| data.into_iter().map(|d| d.1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_come_back_in_input_order_or_not_at_all() {
        let answer = br#"{"data":[{"index":1,"embedding":[2.0]},{"index":0,"embedding":[1.0]}]}"#;
        assert_eq!(
            embeddings(answer, 2),
            Some(vec![json!([1.0]), json!([2.0])])
        );
        assert_eq!(embeddings(answer, 3), None);
        assert_eq!(embeddings(b"nonsense", 1), None);
        assert!(carries_text(UPSERT) && carries_text(SEARCH));
        assert!(!carries_text("/v1/collections/{name}/points/count"));
    }
}
