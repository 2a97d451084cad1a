//! Patches: JSON merge patch (RFC 7386) and JSON patch (RFC 6902, `test`
//! included). A strategic merge patch is applied as a merge patch: for the
//! types served so far (maps of strings, no lists with merge keys) the two
//! agree; the directives (`$patch`, `$retainKeys`) are refused rather
//! than stored.

use serde_json::{Map, Value};

use crate::status::KubeError;

/// RFC 7386: objects merge key by key, `null` removes, anything else
/// replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// A strategic merge patch, for the types served (see the module).
pub fn strategic(target: &mut Value, patch: &Value) -> Result<(), KubeError> {
    if let Some(key) = directive(patch) {
        return Err(KubeError::bad_request(format!(
            "strategic merge patch directive {key} is not supported; send a JSON merge patch"
        )));
    }
    merge(target, patch);
    Ok(())
}

fn directive(v: &Value) -> Option<String> {
    match v {
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            if k.starts_with('$') {
                Some(k.clone())
            } else {
                directive(v)
            }
        }),
        Value::Array(a) => a.iter().find_map(directive),
        _ => None,
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Splits a JSON pointer into its parent's pointer and last token.
fn split(path: &str) -> Result<(&str, String), KubeError> {
    if path.is_empty() {
        return Err(KubeError::bad_request(
            "a JSON patch may not replace the whole object",
        ));
    }
    let at = path
        .rfind('/')
        .ok_or_else(|| KubeError::bad_request(format!("{path:?} is not a JSON pointer")))?;
    Ok((&path[..at], unescape(&path[at + 1..])))
}

fn index(token: &str, len: usize, adding: bool) -> Result<usize, KubeError> {
    if adding && token == "-" {
        return Ok(len);
    }
    let i: usize = token
        .parse()
        .map_err(|_| KubeError::bad_request(format!("{token:?} is not an array index")))?;
    let max = if adding { len } else { len.saturating_sub(1) };
    if i > max || (!adding && len == 0) {
        return Err(KubeError::bad_request(format!("index {i} is out of range")));
    }
    Ok(i)
}

fn missing(path: &str) -> KubeError {
    KubeError::bad_request(format!("the path {path:?} does not exist"))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), KubeError> {
    let (parent, last) = split(path)?;
    match doc.pointer_mut(parent).ok_or_else(|| missing(parent))? {
        Value::Object(m) => {
            m.insert(last, value);
        }
        Value::Array(a) => {
            let i = index(&last, a.len(), true)?;
            a.insert(i, value);
        }
        _ => return Err(missing(path)),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, KubeError> {
    let (parent, last) = split(path)?;
    match doc.pointer_mut(parent).ok_or_else(|| missing(parent))? {
        Value::Object(m) => m.remove(&last).ok_or_else(|| missing(path)),
        Value::Array(a) => {
            let i = index(&last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(missing(path)),
    }
}

/// RFC 6902 on `doc`: every operation, or none (the caller keeps the
/// original until this returns Ok).
pub fn json_patch(mut doc: Value, ops: &Value) -> Result<Value, KubeError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| KubeError::bad_request("a JSON patch is an array of operations"))?;
    for op in ops {
        let field = |k: &str| op.get(k).and_then(Value::as_str);
        let path =
            field("path").ok_or_else(|| KubeError::bad_request("an operation has no path"))?;
        let value = || {
            op.get("value").cloned().ok_or_else(|| {
                KubeError::bad_request(format!("{path}: the operation has no value"))
            })
        };
        match field("op").unwrap_or_default() {
            "add" => add(&mut doc, path, value()?)?,
            "remove" => {
                remove(&mut doc, path)?;
            }
            "replace" => {
                remove(&mut doc, path)?;
                add(&mut doc, path, value()?)?;
            }
            "move" | "copy" => {
                let from = field("from")
                    .ok_or_else(|| KubeError::bad_request(format!("{path}: no from")))?;
                let moved = if field("op") == Some("move") {
                    remove(&mut doc, from)?
                } else {
                    doc.pointer(from).cloned().ok_or_else(|| missing(from))?
                };
                add(&mut doc, path, moved)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value()?) {
                    return Err(KubeError::invalid(
                        "JSON patch",
                        path,
                        format!("test failed: {path} does not hold the given value"),
                    ));
                }
            }
            other => {
                return Err(KubeError::bad_request(format!(
                    "unknown JSON patch operation {other:?}"
                )))
            }
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
        merge(&mut doc, &json!({"a": ["x"]}));
        assert_eq!(doc["a"], json!(["x"]));
    }

    #[test]
    fn json_patch_applies_all_or_fails_on_a_test() {
        let doc = json!({"data": {"a": "1"}, "list": [1, 2]});
        let out = json_patch(
            doc.clone(),
            &json!([
                {"op": "test", "path": "/data/a", "value": "1"},
                {"op": "replace", "path": "/data/a", "value": "2"},
                {"op": "add", "path": "/list/-", "value": 3},
                {"op": "remove", "path": "/list/0"},
                {"op": "copy", "from": "/data/a", "path": "/data/b"}
            ]),
        )
        .unwrap();
        assert_eq!(out, json!({"data": {"a": "2", "b": "2"}, "list": [2, 3]}));
        let failed = json_patch(
            doc,
            &json!([{"op": "test", "path": "/data/a", "value": "9"}]),
        );
        assert_eq!(failed.unwrap_err().code, 422);
        assert!(json_patch(json!({}), &json!([{"op": "remove", "path": "/x/y"}])).is_err());
        assert!(json_patch(json!({"l": []}), &json!([{"op": "remove", "path": "/l/0"}])).is_err());
    }

    #[test]
    fn strategic_directives_are_refused_not_stored() {
        let mut doc = json!({"data": {}});
        assert!(strategic(&mut doc, &json!({"data": {"$patch": "replace"}})).is_err());
        strategic(&mut doc, &json!({"data": {"k": "v"}})).unwrap();
        assert_eq!(doc["data"]["k"], "v");
    }
}
