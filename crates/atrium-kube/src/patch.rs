//! Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902, `test`
//! included) and strategic merge patch, with the merge keys of the
//! built-in types served and the directives kubectl sends.

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

/// The merge key of a list field, as the built-in types declare it
/// (`patchMergeKey`): its elements are merged by that key rather than the
/// list replaced. Lists not named here are replaced, as upstream's atomic
/// lists are.
pub(crate) fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "envFrom" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        "conditions" => "type",
        "ownerReferences" => "uid",
        _ => return None,
    })
}

/// A strategic merge patch (as kubectl computes one for built-in types):
/// maps merge as in a merge patch; lists with a merge key merge element
/// by element (`$patch: delete` removes one, `$patch: replace` replaces
/// the list); `$deleteFromPrimitiveList/<field>` removes values from a
/// list of scalars; `$retainKeys` keeps only the keys it names;
/// `$setElementOrder/<field>` orders a merged list.
pub fn strategic(target: &mut Value, patch: &Value) -> Result<(), KubeError> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        if let Value::Object(m) = &mut replaced {
            m.remove("$patch");
        }
        *target = replaced;
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(gone)) = (t.get_mut(field), v) {
                list.retain(|x| !gone.contains(x));
            }
            continue;
        }
        if k.starts_with("$setElementOrder/") || k == "$patch" {
            continue;
        }
        if k == "$retainKeys" {
            let keep: Vec<&str> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            t.retain(|key, _| keep.contains(&key.as_str()) || p.contains_key(key));
            continue;
        }
        if k.starts_with('$') {
            return Err(KubeError::bad_request(format!(
                "strategic merge patch directive {k} is not supported"
            )));
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (merge_key(k), v) {
            (Some(key), Value::Array(items)) => {
                let base = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                merge_list(base, items, key)?;
                if let Some(Value::Array(order)) = p.get(&format!("$setElementOrder/{k}")) {
                    reorder(base, order, key);
                }
            }
            _ => strategic(t.entry(k.clone()).or_insert(Value::Null), v)?,
        }
    }
    Ok(())
}

/// Merges `items` into the list `base` element by `key`.
fn merge_list(base: &mut Value, items: &[Value], key: &str) -> Result<(), KubeError> {
    if !base.is_array() {
        *base = Value::Array(Vec::new());
    }
    let Value::Array(list) = base else {
        return Ok(());
    };
    for item in items {
        let directive = item.get("$patch").and_then(Value::as_str);
        if directive == Some("replace") {
            list.clear();
            continue;
        }
        let id = item.get(key);
        let at = id.and_then(|id| list.iter().position(|x| x.get(key) == Some(id)));
        match (directive, at) {
            (Some("delete"), Some(i)) => {
                list.remove(i);
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => strategic(&mut list[i], item)?,
            (_, None) => {
                let mut fresh = Value::Null;
                strategic(&mut fresh, item)?;
                list.push(fresh);
            }
        }
    }
    Ok(())
}

/// Orders `list` as `order` (elements named by `key`); the rest after.
fn reorder(list: &mut Value, order: &[Value], key: &str) {
    let Value::Array(items) = list else { return };
    let rank = |x: &Value| {
        order
            .iter()
            .position(|o| o.get(key) == x.get(key))
            .unwrap_or(order.len())
    };
    items.sort_by_key(rank);
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
    fn strategic_patches_merge_containers_by_name_as_kubectl_sends_them() {
        let mut deploy = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "main", "image": "acme/x:1", "env": [{"name": "A", "value": "1"}]},
            {"name": "side", "image": "acme/y:1"}]}}}});
        // What `kubectl apply` sends for a changed env of one container.
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "side"}, {"name": "main"}],
            "containers": [{"name": "main", "env": [{"name": "B", "value": "2"}]},
                           {"name": "side", "$patch": "delete"}]}}}});
        strategic(&mut deploy, &patch).unwrap();
        let containers = &deploy["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers.as_array().unwrap().len(), 1);
        assert_eq!(
            containers[0]["image"], "acme/x:1",
            "the rest of the element stays"
        );
        assert_eq!(
            containers[0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
        );
        let mut args = json!({"args": ["a", "b", "c"]});
        strategic(&mut args, &json!({"$deleteFromPrimitiveList/args": ["b"]})).unwrap();
        assert_eq!(args["args"], json!(["a", "c"]));
        assert!(strategic(&mut args, &json!({"$unknown": 1})).is_err());
    }
}
