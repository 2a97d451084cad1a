//! What the server decides of an object's metadata: names are checked,
//! `generateName` completed, and `uid`, `creationTimestamp` and
//! `namespace` set on create and kept on every update; `resourceVersion`
//! is the store's revision, written into each object as it leaves.
//! Whatever a client sends for those is not taken.

use serde_json::{json, Map, Value};

use crate::resource::ResourceType;
use crate::status::KubeError;

/// A DNS-1123 label: what a namespace's name must be.
pub(crate) fn dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 subdomain: what most objects' names must be.
fn dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(dns_label)
}

/// Refuses a name the resource cannot have, with upstream's wording.
pub fn check_name(r: &ResourceType, name: &str) -> Result<(), KubeError> {
    // A namespace's name becomes part of others' names: a label, as
    // upstream's. Every other object's is a subdomain (a definition's is
    // `<plural>.<group>`).
    let label = r.builtin_kind() == "Namespace";
    let ok = if label {
        dns_label(name)
    } else {
        dns_subdomain(name)
    };
    if ok {
        return Ok(());
    }
    let rule = if !label {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
         '-' or '.', and must start and end with an alphanumeric character"
    } else {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or \
         '-', and must start and end with an alphanumeric character (at most 63)"
    };
    Err(KubeError::invalid(
        &r.kind,
        name,
        format!("metadata.name: Invalid value: {name:?}: {rule}"),
    ))
}

fn metadata(obj: &mut Value) -> Result<&mut Map<String, Value>, KubeError> {
    let Some(root) = obj.as_object_mut() else {
        return Err(KubeError::bad_request("the body is not a JSON object"));
    };
    let meta = root.entry("metadata").or_insert_with(|| json!({}));
    meta.as_object_mut()
        .ok_or_else(|| KubeError::bad_request("metadata is not an object"))
}

/// The name an object's metadata gives.
pub fn name_of(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/name").and_then(Value::as_str)
}

/// Checks `apiVersion` and `kind` against the resource the request is for
/// (filling them in when absent).
fn check_type(r: &ResourceType, obj: &mut Value) -> Result<(), KubeError> {
    let api_version = r.api_version();
    for (field, want) in [("apiVersion", api_version.as_str()), ("kind", &r.kind)] {
        match obj.get(field).and_then(Value::as_str) {
            None => obj[field] = json!(want),
            Some(got) if got == want => {}
            Some(got) => {
                return Err(KubeError::bad_request(format!(
                    "the {field} of the object ({got}) does not match the request ({want})"
                )))
            }
        }
    }
    Ok(())
}

/// Everything a new object's metadata gets from the server. Returns its
/// name. `suffix` completes a `generateName`; `uid` and `now` are new.
pub fn prepare_create(
    r: &ResourceType,
    obj: &mut Value,
    namespace: Option<&str>,
    uid: &str,
    now: &str,
    suffix: impl FnOnce() -> String,
) -> Result<String, KubeError> {
    check_type(r, obj)?;
    let meta = metadata(obj)?;
    let name = match meta.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => match meta.get("generateName").and_then(Value::as_str) {
            Some(prefix) if !prefix.is_empty() => format!("{prefix}{}", suffix()),
            _ => {
                return Err(KubeError::invalid(
                    &r.kind,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ))
            }
        },
    };
    check_name(r, &name)?;
    meta.insert("name".into(), json!(name));
    match (r.namespaced, namespace) {
        (true, Some(ns)) => {
            if meta
                .get("namespace")
                .and_then(Value::as_str)
                .is_some_and(|n| n != ns)
            {
                return Err(KubeError::bad_request(
                    "the namespace of the provided object does not match the namespace sent \
                     on the request",
                ));
            }
            meta.insert("namespace".into(), json!(ns));
        }
        (true, None) => {
            return Err(KubeError::bad_request(format!(
                "{} is namespaced: create it in a namespace",
                r.plural
            )))
        }
        (false, _) => {
            meta.remove("namespace");
        }
    }
    meta.insert("uid".into(), json!(uid));
    meta.insert("creationTimestamp".into(), json!(now));
    if obj.get("spec").is_some() || r.custom.is_some() {
        obj["metadata"]["generation"] = json!(1);
    }
    // A custom object's status is written only through `/status`.
    if r.custom.is_some() && r.status_is_separate() {
        if let Some(root) = obj.as_object_mut() {
            root.remove("status");
        }
    }
    let meta = metadata(obj)?;
    // `managedFields` is `managed`'s to write, before this.
    for server_only in ["resourceVersion", "selfLink", "deletionTimestamp"] {
        meta.remove(server_only);
    }
    defaults(r, obj)?;
    Ok(name)
}

/// An update keeps what the server decided at creation; the name and
/// namespace cannot change.
pub fn prepare_update(r: &ResourceType, old: &Value, new: &mut Value) -> Result<(), KubeError> {
    check_type(r, new)?;
    let name = name_of(old).unwrap_or_default().to_string();
    let meta = metadata(new)?;
    if let Some(given) = meta.get("name").and_then(Value::as_str) {
        if given != name {
            return Err(KubeError::bad_request(format!(
                "the name of the object ({given}) does not match the name on the URL ({name})"
            )));
        }
    }
    check_finalizers(r, old, meta)?;
    for kept in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match old.pointer(&format!("/metadata/{kept}")) {
            Some(v) => {
                meta.insert(kept.into(), v.clone());
            }
            None => {
                meta.remove(kept);
            }
        }
    }
    meta.remove("selfLink");
    if r.builtin_kind() == "Namespace" {
        // A namespace's phase is the server's.
        new["status"] = old
            .get("status")
            .cloned()
            .unwrap_or(json!({"phase": "Active"}));
    }
    if r.status_is_separate() {
        new["status"] = old.get("status").cloned().unwrap_or(json!({}));
    }
    // The generation counts changes of the spec (of a custom object:
    // of anything but its metadata and status).
    if let Some(generation) = old.pointer("/metadata/generation").and_then(Value::as_i64) {
        let same = if r.custom.is_some() {
            let content = |o: &Value| {
                let mut o = o.as_object().cloned().unwrap_or_default();
                o.remove("metadata");
                o.remove("status");
                o
            };
            content(new) == content(old)
        } else {
            new.get("spec") == old.get("spec")
        };
        let next = if same {
            generation
        } else {
            generation.saturating_add(1)
        };
        new["metadata"]["generation"] = json!(next);
    }
    defaults(r, new)
}

/// A write of `/status`: the object as it was, with the status given.
pub fn prepare_status_update(old: &Value, new: &mut Value) {
    let status = new.get("status").cloned();
    *new = old.clone();
    match status {
        Some(s) => new["status"] = s,
        None => {
            if let Some(o) = new.as_object_mut() {
                o.remove("status");
            }
        }
    }
}

/// Most replicas (or job pods) one object may ask for: each one is a pod,
/// a workload and a placement, made by the controllers on the tenant's
/// behalf, so the bound is Atrium's own for workloads.
const MAX_COUNT: u64 = atrium_core::deployment::MAX_REPLICAS as u64;

/// Refuses a count field that is not a whole number up to [`MAX_COUNT`].
fn bounded(r: &ResourceType, obj: &Value, field: &str) -> Result<(), KubeError> {
    let Some(v) = obj.pointer(&format!("/spec/{field}")) else {
        return Ok(());
    };
    if v.as_u64().is_some_and(|n| n <= MAX_COUNT) {
        return Ok(());
    }
    Err(KubeError::invalid(
        &r.kind,
        name_of(obj).unwrap_or_default(),
        format!("spec.{field}: Invalid value: {v}: must be a whole number from 0 to {MAX_COUNT}"),
    ))
}

/// What each kind gets when it does not say.
fn defaults(r: &ResourceType, obj: &mut Value) -> Result<(), KubeError> {
    match r.builtin_kind() {
        "Deployment" | "ReplicaSet" => bounded(r, obj, "replicas")?,
        "StatefulSet" => {
            bounded(r, obj, "replicas")?;
            if !obj["spec"].is_object() {
                obj["spec"] = json!({});
            }
            let spec = &mut obj["spec"];
            if spec.pointer("/updateStrategy/type").is_none() {
                spec["updateStrategy"] =
                    json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}});
            }
            if spec.get("podManagementPolicy").is_none() {
                spec["podManagementPolicy"] = json!("OrderedReady");
            }
            if spec.get("replicas").is_none() {
                spec["replicas"] = json!(1);
            }
        }
        "Job" => {
            for field in ["completions", "parallelism", "backoffLimit"] {
                bounded(r, obj, field)?;
            }
        }
        "Namespace" => {
            if obj.pointer("/spec/finalizers").is_none() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            if obj.pointer("/status/phase").is_none() {
                obj["status"] = json!({"phase": "Active"});
            }
        }
        "Secret" => {
            if obj.get("type").is_none() {
                obj["type"] = json!("Opaque");
            }
            // `stringData` is a write-only convenience: merged into `data`.
            if let Some(Value::Object(strings)) =
                obj.as_object_mut().and_then(|o| o.remove("stringData"))
            {
                let data = obj
                    .as_object_mut()
                    .map(|o| o.entry("data").or_insert_with(|| json!({})));
                if let Some(Value::Object(data)) = data {
                    for (k, v) in strings {
                        let text = v.as_str().unwrap_or_default();
                        data.insert(k, json!(base64(text.as_bytes())));
                    }
                }
            }
            if let Some(Value::Object(data)) = obj.get("data") {
                if let Some((k, _)) = data
                    .iter()
                    .find(|(_, v)| !v.as_str().is_some_and(is_base64))
                {
                    return Err(KubeError::invalid(
                        "Secret",
                        name_of(obj).unwrap_or_default(),
                        format!("data[{k}]: the value is not base64"),
                    ));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn is_base64(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    s.len().is_multiple_of(4)
        && s.len() - body.len() <= 2
        && body.bytes().all(|b| BASE64.contains(&b))
}

/// The object as it leaves the server: its `resourceVersion` the store's
/// revision.
fn finalizers(meta: &Map<String, Value>) -> Vec<&str> {
    meta.get("finalizers")
        .and_then(Value::as_array)
        .map(|f| f.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Finalizers are names (at most 64 of them), and an object being deleted
/// may lose finalizers but gain none, as upstream.
fn check_finalizers(
    r: &ResourceType,
    old: &Value,
    new: &Map<String, Value>,
) -> Result<(), KubeError> {
    let name = name_of(old).unwrap_or_default();
    if let Some(f) = new.get("finalizers").filter(|f| !f.is_null()) {
        let ok = f.as_array().is_some_and(|list| {
            list.len() <= 64
                && list
                    .iter()
                    .all(|x| x.as_str().is_some_and(|s| !s.is_empty() && s.len() <= 316))
        });
        if !ok {
            return Err(KubeError::invalid(
                &r.kind,
                name,
                "metadata.finalizers: at most 64 names of 1 to 316 characters",
            ));
        }
    }
    let deleting = old.pointer("/metadata/deletionTimestamp").is_some();
    let before: Vec<&str> = old["metadata"]
        .as_object()
        .map(finalizers)
        .unwrap_or_default();
    if deleting && finalizers(new).iter().any(|f| !before.contains(f)) {
        return Err(KubeError::forbidden(
            &r.plural,
            name,
            "no new finalizers can be added if the object is being deleted",
        ));
    }
    Ok(())
}

/// Whether a delete only marks `obj`: it holds finalizers.
pub fn has_finalizers(obj: &Value) -> bool {
    obj["metadata"]
        .as_object()
        .is_some_and(|m| !finalizers(m).is_empty())
}

/// Marks `obj` as being deleted at `now`; whether it was not already.
pub fn mark_deleting(obj: &mut Value, now: &str) -> bool {
    if obj.pointer("/metadata/deletionTimestamp").is_some() {
        return false;
    }
    obj["metadata"]["deletionTimestamp"] = json!(now);
    obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    true
}

/// Whether `obj` was being deleted and its last finalizer is gone: the
/// write that made it so deletes it.
pub fn finalized(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some() && !has_finalizers(obj)
}

pub fn with_resource_version(mut obj: Value, revision: i64) -> Value {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), json!(revision.to_string()));
    }
    obj
}

/// How long ago, as kubectl prints ages (`45s`, `3m20s`, `5h`, `12d`).
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    match () {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 && s % 60 != 0 => format!("{m}m{}s", s % 60),
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 && m % 60 != 0 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if h < 192 && h % 24 != 0 => format!("{d}d{}h", h % 24),
        _ if d < 730 => format!("{d}d"),
        _ => format!("{}y{}d", d / 365, d % 365),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::find;

    fn cm() -> &'static ResourceType {
        find("", "v1", "configmaps").unwrap()
    }

    #[test]
    fn the_server_decides_identity_whatever_the_client_sends() {
        let mut obj = json!({"metadata": {"generateName": "job-", "uid": "forged",
            "resourceVersion": "7", "namespace": "demo"}, "data": {"a": "b"}});
        let name = prepare_create(cm(), &mut obj, Some("demo"), "u-1", "now", || {
            "x1y2z".into()
        })
        .unwrap();
        assert_eq!(name, "job-x1y2z");
        assert_eq!(obj["metadata"]["uid"], "u-1");
        assert_eq!(obj["metadata"]["resourceVersion"], Value::Null);
        assert_eq!(obj["kind"], "ConfigMap");
        let mut other_ns = json!({"metadata": {"name": "a", "namespace": "prod"}});
        assert!(prepare_create(cm(), &mut other_ns, Some("demo"), "u", "t", String::new).is_err());
        let mut renamed = json!({"metadata": {"name": "b", "uid": "forged-too"}});
        assert!(prepare_update(cm(), &obj, &mut renamed).is_err());
        let mut kept = json!({"metadata": {"uid": "forged-too"}, "data": {}});
        prepare_update(cm(), &obj, &mut kept).unwrap();
        assert_eq!(kept["metadata"]["uid"], "u-1");
        assert_eq!(kept["metadata"]["name"], "job-x1y2z");
    }

    #[test]
    fn finalizers_are_bounded_and_none_is_added_to_an_object_going_away() {
        let old = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "finalizers": ["a.io/x"]}});
        let with = |f: Value| {
            let mut new = old.clone();
            new["metadata"]["finalizers"] = f;
            new
        };
        let many: Vec<String> = (0..65).map(|i| format!("x.io/{i}")).collect();
        assert_eq!(
            prepare_update(cm(), &old, &mut with(json!(many)))
                .unwrap_err()
                .code,
            422
        );
        let long = "x".repeat(317);
        assert_eq!(
            prepare_update(cm(), &old, &mut with(json!([long])))
                .unwrap_err()
                .code,
            422
        );
        assert_eq!(
            prepare_update(cm(), &old, &mut with(json!([7])))
                .unwrap_err()
                .code,
            422
        );
        let mut going = old.clone();
        assert!(mark_deleting(&mut going, "2026-01-01T00:00:00Z"));
        assert!(
            !mark_deleting(&mut going, "2026-01-02T00:00:00Z"),
            "marked once"
        );
        let mut more = going.clone();
        more["metadata"]["finalizers"] = json!(["a.io/x", "b.io/y"]);
        assert_eq!(
            prepare_update(cm(), &going, &mut more).unwrap_err().code,
            403
        );
        let mut fewer = going.clone();
        fewer["metadata"]["finalizers"] = json!([]);
        prepare_update(cm(), &going, &mut fewer).unwrap();
        assert!(finalized(&fewer));
    }

    #[test]
    fn names_follow_rfc_1123() {
        let ns = find("", "v1", "namespaces").unwrap();
        for bad in ["", "UPPER", "-a", "a-", "a_b", "../x", &"a".repeat(64)] {
            assert!(check_name(ns, bad).is_err(), "{bad:?}");
        }
        assert!(check_name(ns, "team-a").is_ok());
        assert!(check_name(cm(), "a.b-c").is_ok());
        assert!(check_name(ns, "a.b").is_err());
    }

    #[test]
    fn secrets_take_string_data_as_base64() {
        let secret = find("", "v1", "secrets").unwrap();
        let mut obj = json!({"metadata": {"name": "s"}, "stringData": {"password": "hunter2"}});
        prepare_create(secret, &mut obj, Some("d"), "u", "t", String::new).unwrap();
        assert_eq!(obj["data"]["password"], "aHVudGVyMg==");
        assert_eq!(obj["type"], "Opaque");
        assert!(obj.get("stringData").is_none());
        let mut bad = json!({"metadata": {"name": "s"}, "data": {"k": "not base64!"}});
        assert!(prepare_create(secret, &mut bad, Some("d"), "u", "t", String::new).is_err());
    }

    #[test]
    fn ages_read_as_kubectl_prints_them() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(200), "3m20s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(3 * 3600 + 60), "3h1m");
        assert_eq!(age(30 * 3600), "30h");
        assert_eq!(age(3 * 86400), "3d");
    }
}
