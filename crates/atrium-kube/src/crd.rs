//! CustomResourceDefinitions (`apiextensions.k8s.io/v1`): a tenant's own
//! resource types in its cluster. A definition is checked when it is
//! written (`prepare`: names, scope, versions, each version's structural
//! schema, subresources, printer columns) and gets its status from the
//! server (`NamesAccepted`, `Established`, `storedVersions`); once stored,
//! each served version is a resource type of the cluster (`types_of`),
//! its objects checked against that version's schema (`schema`).
//!
//! What is deliberately absent: conversion webhooks (versions share one
//! stored form, as with upstream's `None` strategy) and CEL rules, both
//! refused when a definition asks for them. A definition may not claim a
//! built-in group, upstream's protected `k8s.io` groups, or Atrium's own.

use serde_json::{json, Value};

use crate::meta::dns_label;
use crate::resource::{builtin_group, ResourceType};
use crate::status::KubeError;

const KIND: &str = "CustomResourceDefinition";
/// Most versions one definition may serve, and printer columns per
/// version.
const MAX_VERSIONS: usize = 16;
const MAX_COLUMNS: usize = 32;

/// A definition's names, as its types carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub group: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
}

/// Where `/scale` reads and writes an object's replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scale {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

/// One `additionalPrinterColumns` entry: a column `kubectl get` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub kind: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// What a custom resource type is beyond its names: one served version of
/// a definition.
#[derive(Debug, PartialEq)]
pub struct Custom {
    pub schema: Value,
    /// A `status` subresource: the object's writes keep its status.
    pub status: bool,
    pub scale: Option<Scale>,
    pub columns: Vec<Column>,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub list_kind: String,
}

fn kind_name(s: &str) -> bool {
    s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric())
}

/// A `jsonPath` of a printer column or a scale path: `.a.b[0].c`, as
/// JSON pointer segments.
pub fn path_segments(path: &str) -> Option<Vec<String>> {
    let rest = path.strip_prefix('.')?;
    let mut out = Vec::new();
    for part in rest.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, i)) => (n, Some(i.strip_suffix(']')?)),
            None => (part, None),
        };
        let plain = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !plain(name) {
            return None;
        }
        out.push(name.to_string());
        if let Some(i) = index {
            out.push(i.parse::<usize>().ok()?.to_string());
        }
    }
    Some(out)
}

/// The value at `path` (a checked `jsonPath`) in `obj`.
pub fn at_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let segments = path_segments(path)?;
    segments.iter().try_fold(obj, |v, s| match v {
        Value::Array(items) => items.get(s.parse::<usize>().ok()?),
        _ => v.get(s),
    })
}

/// Where `/scale` writes: the object at `path`, made as needed.
pub fn at_path_mut<'a>(obj: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    let segments = path_segments(path)?;
    let mut v = obj;
    for s in segments {
        if v.is_null() {
            *v = json!({});
        }
        v = v.as_object_mut()?.entry(s).or_insert(Value::Null);
    }
    Some(v)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Checks a definition being written, fills in what its names leave out,
/// and sets its status. `old` is the stored one, on an update.
pub fn prepare(obj: &mut Value, old: Option<&Value>) -> Result<(), KubeError> {
    let name = text(obj, "/metadata/name").to_string();
    let invalid = |why: String| KubeError::invalid(KIND, &name, why);
    let mut errors = Vec::new();
    if !obj["spec"].is_object() {
        return Err(invalid("spec: Required value".into()));
    }
    let spec = &mut obj["spec"];
    let group = text(spec, "/group").to_string();
    let protected = ["k8s.io", "kubernetes.io", "atrium.dev"]
        .iter()
        .any(|p| group == *p || group.ends_with(&format!(".{p}")));
    if !group.contains('.') || !group.split('.').all(dns_label) || group.len() > 253 {
        errors.push(format!(
            "spec.group: Invalid value: {group:?}: should be a domain with at least one dot"
        ));
    } else if builtin_group(&group) || protected {
        errors.push(format!(
            "spec.group: Forbidden: {group:?} is reserved for the server's own types"
        ));
    }
    let names = &mut spec["names"];
    if !names.is_object() {
        return Err(invalid("spec.names: Required value".into()));
    }
    let kind = text(names, "/kind").to_string();
    if !kind_name(&kind) {
        errors.push(format!(
            "spec.names.kind: Invalid value: {kind:?}: must start with a letter and hold only \
             letters and digits"
        ));
    }
    if text(names, "/singular").is_empty() {
        names["singular"] = json!(kind.to_lowercase());
    }
    if text(names, "/listKind").is_empty() {
        names["listKind"] = json!(format!("{kind}List"));
    }
    let plural = text(names, "/plural").to_string();
    for field in ["plural", "singular"] {
        let v = text(names, &format!("/{field}"));
        if !dns_label(v) {
            errors.push(format!(
                "spec.names.{field}: Invalid value: {v:?}: must be a lowercase DNS-1123 label"
            ));
        }
    }
    if !kind_name(text(names, "/listKind")) {
        errors.push("spec.names.listKind: Invalid value: must hold only letters and digits".into());
    }
    for field in ["shortNames", "categories"] {
        if let Some(bad) = strings(&names[field]).into_iter().find(|s| !dns_label(s)) {
            errors.push(format!(
                "spec.names.{field}: Invalid value: {bad:?}: must be a lowercase DNS-1123 label"
            ));
        }
    }
    if name != format!("{plural}.{group}") {
        errors.push(format!(
            "metadata.name: Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group \
             ({plural}.{group})"
        ));
    }
    let scope = text(spec, "/scope").to_string();
    if !matches!(scope.as_str(), "Namespaced" | "Cluster") {
        errors.push(format!(
            "spec.scope: Unsupported value: {scope:?}: supported values: \"Cluster\", \"Namespaced\""
        ));
    }
    let strategy = text(spec, "/conversion/strategy");
    if !strategy.is_empty() && strategy != "None" {
        errors.push(format!(
            "spec.conversion.strategy: Unsupported value: {strategy:?}: this server has no \
             conversion webhooks; its versions share one stored form (\"None\")"
        ));
    }
    if spec.get("preserveUnknownFields") == Some(&json!(true)) {
        errors.push(
            "spec.preserveUnknownFields: Invalid value: true: must be false; mark the fields to \
             keep with x-kubernetes-preserve-unknown-fields"
                .into(),
        );
    }
    errors.extend(check_versions(spec));
    if let Some(old) = old {
        for (field, pointer) in [("spec.group", "/spec/group"), ("spec.scope", "/spec/scope")] {
            if old.pointer(pointer) != obj.pointer(pointer) {
                errors.push(format!("{field}: Invalid value: field is immutable"));
            }
        }
    }
    if !errors.is_empty() {
        return Err(invalid(errors.join(", ")));
    }
    obj["status"] = status(obj, old);
    Ok(())
}

fn check_versions(spec: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let Some(versions) = spec["versions"].as_array().filter(|v| !v.is_empty()) else {
        return vec![
            "spec.versions: Invalid value: must have exactly one version marked as storage version"
                .into(),
        ];
    };
    if versions.len() > MAX_VERSIONS {
        errors.push(format!(
            "spec.versions: Too many: at most {MAX_VERSIONS} versions"
        ));
    }
    let storage = versions
        .iter()
        .filter(|v| v["storage"] == json!(true))
        .count();
    if storage != 1 {
        errors.push(format!(
            "spec.versions: Invalid value: {storage}: must have exactly one version marked as \
             storage version"
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        let at = format!("spec.versions[{i}]");
        let name = text(v, "/name");
        if !dns_label(name) || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
            errors.push(format!(
                "{at}.name: Invalid value: {name:?}: must be a DNS-1035 label"
            ));
        }
        if versions[..i].iter().any(|o| o["name"] == v["name"]) {
            errors.push(format!("{at}.name: Duplicate value: {name:?}"));
        }
        match v.pointer("/schema/openAPIV3Schema") {
            Some(schema) => {
                if let Err(e) = crate::schema::check(schema) {
                    errors.extend(e.into_iter().map(|e| format!("{at}.schema.{e}")));
                }
            }
            None => errors.push(format!(
                "{at}.schema.openAPIV3Schema: Required value: schemas are required"
            )),
        }
        if let Some(scale) = v.pointer("/subresources/scale") {
            let good = |field: &str, prefixes: &[&str]| {
                let p = text(scale, &format!("/{field}"));
                path_segments(p).is_some() && prefixes.iter().any(|pre| p.starts_with(pre))
            };
            if !good("specReplicasPath", &[".spec."]) {
                errors.push(format!("{at}.subresources.scale.specReplicasPath: Invalid value: should be a json path under .spec"));
            }
            if !good("statusReplicasPath", &[".status."]) {
                errors.push(format!("{at}.subresources.scale.statusReplicasPath: Invalid value: should be a json path under .status"));
            }
            if scale.get("labelSelectorPath").is_some()
                && !good("labelSelectorPath", &[".spec.", ".status."])
            {
                errors.push(format!("{at}.subresources.scale.labelSelectorPath: Invalid value: should be a json path under .spec or .status"));
            }
        }
        let columns = v["additionalPrinterColumns"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if columns.len() > MAX_COLUMNS {
            errors.push(format!(
                "{at}.additionalPrinterColumns: Too many: at most {MAX_COLUMNS}"
            ));
        }
        for (j, c) in columns.iter().enumerate() {
            let at = format!("{at}.additionalPrinterColumns[{j}]");
            if text(c, "/name").is_empty() {
                errors.push(format!("{at}.name: Required value"));
            }
            let ty = text(c, "/type");
            if !["integer", "number", "string", "boolean", "date"].contains(&ty) {
                errors.push(format!("{at}.type: Unsupported value: {ty:?}: supported values: \"boolean\", \"date\", \"integer\", \"number\", \"string\""));
            }
            if path_segments(text(c, "/jsonPath")).is_none() {
                errors.push(format!(
                    "{at}.jsonPath: Invalid value: {:?}: must be a simple path such as .spec.size or .status.items[0].name",
                    text(c, "/jsonPath")
                ));
            }
        }
    }
    errors
}

/// The status the server gives a definition it accepted: its names taken,
/// established at once (nothing here waits), and every version ever
/// stored kept in `storedVersions`.
fn status(obj: &Value, old: Option<&Value>) -> Value {
    let mut stored = old
        .map(|o| strings(&o["status"]["storedVersions"]))
        .unwrap_or_default();
    let versions = obj["spec"]["versions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if let Some(storage) = versions.iter().find(|v| v["storage"] == json!(true)) {
        let name = text(storage, "/name").to_string();
        if !stored.contains(&name) {
            stored.push(name);
        }
    }
    let since = |kind: &str| {
        old.and_then(|o| o["status"]["conditions"].as_array())
            .and_then(|c| c.iter().find(|c| c["type"] == kind))
            .and_then(|c| c.get("lastTransitionTime").cloned())
            .or_else(|| obj.pointer("/metadata/creationTimestamp").cloned())
            .unwrap_or(Value::Null)
    };
    json!({
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": since("NamesAccepted")},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": since("Established")},
        ],
        "acceptedNames": obj["spec"]["names"],
        "storedVersions": stored,
    })
}

/// The names of `obj`'s definition, unless another definition of the
/// cluster (`others`) already serves its kind in its group.
pub fn kind_conflict(obj: &Value, others: &[&Value]) -> Option<String> {
    let (group, kind) = (text(obj, "/spec/group"), text(obj, "/spec/names/kind"));
    let name = text(obj, "/metadata/name");
    others
        .iter()
        .find(|o| {
            text(o, "/metadata/name") != name
                && text(o, "/spec/group") == group
                && text(o, "/spec/names/kind") == kind
        })
        .map(|o| {
            format!(
                "spec.names.kind: Invalid value: {kind:?}: is already in use by {}",
                text(o, "/metadata/name")
            )
        })
}

/// The resource types a stored definition serves: one per served
/// version, the most preferred first.
pub fn types_of(obj: &Value) -> Vec<ResourceType> {
    let names = &obj["spec"]["names"];
    let base = Names {
        group: text(obj, "/spec/group").to_string(),
        kind: text(names, "/kind").to_string(),
        plural: text(names, "/plural").to_string(),
        singular: text(names, "/singular").to_string(),
        namespaced: text(obj, "/spec/scope") == "Namespaced",
    };
    let mut versions: Vec<&Value> = obj["spec"]["versions"]
        .as_array()
        .map(|v| v.iter().filter(|v| v["served"] == json!(true)).collect())
        .unwrap_or_default();
    versions.sort_by(|a, b| version_order(text(a, "/name"), text(b, "/name")));
    versions
        .into_iter()
        .map(|v| {
            let scale = v.pointer("/subresources/scale").map(|s| Scale {
                spec_replicas: text(s, "/specReplicasPath").to_string(),
                status_replicas: text(s, "/statusReplicasPath").to_string(),
                label_selector: s["labelSelectorPath"].as_str().map(str::to_string),
            });
            let columns = v["additionalPrinterColumns"]
                .as_array()
                .map(|cs| {
                    cs.iter()
                        .map(|c| Column {
                            name: text(c, "/name").to_string(),
                            kind: text(c, "/type").to_string(),
                            format: text(c, "/format").to_string(),
                            description: text(c, "/description").to_string(),
                            priority: c["priority"].as_i64().unwrap_or(0),
                            json_path: text(c, "/jsonPath").to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let custom = Custom {
                schema: v
                    .pointer("/schema/openAPIV3Schema")
                    .cloned()
                    .unwrap_or(json!({"type": "object"})),
                status: v.pointer("/subresources/status").is_some(),
                scale,
                columns,
                short_names: strings(&names["shortNames"]),
                categories: strings(&names["categories"]),
                list_kind: text(names, "/listKind").to_string(),
            };
            ResourceType::custom(base.clone(), text(v, "/name").to_string(), custom)
        })
        .collect()
}

/// Upstream's version priority: GA before beta before alpha, higher
/// numbers first, anything else last by name.
pub fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn rank(v: &str) -> (u8, std::cmp::Reverse<u64>, std::cmp::Reverse<u64>, String) {
        let parsed = v.strip_prefix('v').and_then(|rest| {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            let major: u64 = rest[..digits].parse().ok()?;
            let (level, minor) = match &rest[digits..] {
                "" => (0, "0"),
                tail => match tail.strip_prefix("beta") {
                    Some(n) => (1, n),
                    None => (2, tail.strip_prefix("alpha")?),
                },
            };
            Some((level, major, minor.parse::<u64>().ok()?))
        });
        match parsed {
            Some((level, major, minor)) => (
                level,
                std::cmp::Reverse(major),
                std::cmp::Reverse(minor),
                String::new(),
            ),
            None => (3, std::cmp::Reverse(0), std::cmp::Reverse(0), v.to_string()),
        }
    }
    rank(a).cmp(&rank(b))
}

/// How a write asked for unknown fields to be handled
/// (`fieldValidation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    /// Refused (kubectl's default).
    Strict,
    /// Pruned, each named in a warning (upstream's default).
    Warn,
    /// Pruned silently.
    Ignore,
}

impl FieldValidation {
    pub fn parse(v: Option<&str>) -> Result<FieldValidation, KubeError> {
        match v {
            Some("Strict") => Ok(FieldValidation::Strict),
            None | Some("" | "Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(other) => Err(KubeError::bad_request(format!(
                "fieldValidation {other:?} is not one of Strict, Warn or Ignore"
            ))),
        }
    }
}

/// Checks a custom object being written against its version's schema:
/// defaults filled in, unknown fields pruned (refused under `Strict`),
/// values validated. Returns the warnings to send back.
pub fn admit(
    r: &ResourceType,
    obj: &mut Value,
    validation: FieldValidation,
) -> Result<Vec<String>, KubeError> {
    let Some(custom) = &r.custom else {
        return Ok(Vec::new());
    };
    let outcome = crate::schema::admit(&custom.schema, obj);
    let unknown: Vec<String> = outcome
        .unknown
        .iter()
        .map(|f| format!("unknown field {f:?}"))
        .collect();
    if validation == FieldValidation::Strict && !unknown.is_empty() {
        return Err(KubeError::bad_request(format!(
            "strict decoding error: {}",
            unknown.join(", ")
        )));
    }
    if !outcome.errors.is_empty() {
        let name = text(obj, "/metadata/name").to_string();
        return Err(KubeError::invalid(
            &r.kind,
            &name,
            outcome.errors.join(", "),
        ));
    }
    Ok(match validation {
        FieldValidation::Warn => unknown,
        _ => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition() -> Value {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
            "versions": [
                {"name": "v1beta1", "served": true, "storage": false,
                 "schema": {"openAPIV3Schema": {"type": "object"}}},
                {"name": "v1", "served": true, "storage": true,
                 "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"replicas": {"type": "integer"}}}}}},
                 "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas",
                    "statusReplicasPath": ".status.replicas"}},
                 "additionalPrinterColumns": [{"name": "Replicas", "type": "integer",
                    "jsonPath": ".spec.replicas"}]},
                {"name": "v2alpha1", "served": false, "storage": false,
                 "schema": {"openAPIV3Schema": {"type": "object"}}},
            ]}})
    }

    #[test]
    fn a_definition_is_completed_established_and_serves_its_versions() {
        let mut crd = definition();
        prepare(&mut crd, None).unwrap();
        assert_eq!(crd["spec"]["names"]["singular"], "widget");
        assert_eq!(crd["spec"]["names"]["listKind"], "WidgetList");
        assert_eq!(crd["status"]["conditions"][1]["type"], "Established");
        assert_eq!(crd["status"]["storedVersions"], json!(["v1"]));
        let types = types_of(&crd);
        let versions: Vec<&str> = types.iter().map(|t| t.version.as_ref()).collect();
        assert_eq!(versions, ["v1", "v1beta1"], "served only, preferred first");
        let v1 = &types[0];
        assert_eq!((v1.kind.as_ref(), v1.namespaced), ("Widget", true));
        assert!(v1.status_is_separate() && v1.scalable());
        assert_eq!(v1.short_names(), ["wd"]);
        assert_eq!(
            v1.builtin_kind(),
            "",
            "a custom type gets no built-in kind's rules"
        );
        assert!(!types[1].status_is_separate());
    }

    #[test]
    fn a_definition_may_not_claim_what_is_not_its_own() {
        let refused = |change: &dyn Fn(&mut Value), why: &str| {
            let mut crd = definition();
            change(&mut crd);
            let e = prepare(&mut crd, None).unwrap_err();
            assert!(e.message.contains(why), "{why} not in {}", e.message);
        };
        refused(
            &|c| c["metadata"]["name"] = json!("widgets.other.com"),
            "must be spec.names.plural",
        );
        for group in [
            "apps",
            "rbac.authorization.k8s.io",
            "k8s.io",
            "x.kubernetes.io",
            "atrium.dev",
        ] {
            refused(
                &|c| {
                    c["spec"]["group"] = json!(group);
                    c["metadata"]["name"] = json!(format!("widgets.{group}"));
                },
                "group",
            );
        }
        refused(
            &|c| c["spec"]["versions"][0]["storage"] = json!(true),
            "exactly one version marked as storage",
        );
        refused(
            &|c| c["spec"]["conversion"] = json!({"strategy": "Webhook"}),
            "no conversion webhooks",
        );
        refused(
            &|c| c["spec"]["versions"][0]["schema"] = json!(null),
            "schemas are required",
        );
        refused(&|c| c["spec"]["scope"] = json!("Everywhere"), "spec.scope");
        refused(
            &|c| c["spec"]["names"]["kind"] = json!("Wid get"),
            "spec.names.kind",
        );
        refused(
            &|c| c["spec"]["names"]["plural"] = json!("../x"),
            "spec.names.plural",
        );
        refused(
            &|c| {
                c["spec"]["versions"][1]["additionalPrinterColumns"][0]["jsonPath"] =
                    json!("{.spec}")
            },
            "jsonPath",
        );
        refused(
            &|c| {
                c["spec"]["versions"][1]["subresources"]["scale"]["specReplicasPath"] =
                    json!(".status.x")
            },
            "specReplicasPath",
        );
        let mut old = definition();
        prepare(&mut old, None).unwrap();
        let mut changed = old.clone();
        changed["spec"]["scope"] = json!("Cluster");
        assert!(prepare(&mut changed, Some(&old))
            .unwrap_err()
            .message
            .contains("immutable"));
    }

    #[test]
    fn versions_sort_as_upstream_prefers_them() {
        let mut v = vec![
            "v1alpha1", "foo", "v2", "v1beta2", "v1", "v10beta1", "v1beta1",
        ];
        v.sort_by(|a, b| version_order(a, b));
        assert_eq!(
            v,
            ["v2", "v1", "v10beta1", "v1beta2", "v1beta1", "v1alpha1", "foo"]
        );
    }

    #[test]
    fn paths_read_and_write_nested_fields() {
        let mut obj = json!({"status": {"items": [{"name": "a"}]}});
        assert_eq!(at_path(&obj, ".status.items[0].name"), Some(&json!("a")));
        assert_eq!(at_path(&obj, ".status.nope"), None);
        *at_path_mut(&mut obj, ".spec.replicas").unwrap() = json!(3);
        assert_eq!(obj["spec"]["replicas"], 3);
        assert!(path_segments("spec.x").is_none() && path_segments(".a..b").is_none());
    }
}
