//! Field management: who set which field of an object (`managedFields`),
//! and server-side apply, which reads it to find conflicts.
//!
//! An object's fields are leaf paths: a scalar, a list replaced as a
//! whole, an empty map, or an element of a list merged by key (its key's
//! JSON, as `fieldsV1` spells it: `k:{"name":"main"}`) with the element's
//! own fields under it. Every manager — a `fieldManager` and whether it
//! applies or updates — owns a set of them:
//!
//! - An update (create, replace, patch) owns the leaves it changed and
//!   takes them from every other manager, without conflict.
//! - An apply owns every leaf of its configuration. A leaf another
//!   manager owns, at another value than the applied one, is a conflict
//!   unless forced (forcing takes it). Leaves the manager applied before
//!   and no longer does are removed from the object when no other manager
//!   owns them.
//!
//! The server computes `managedFields`: what a request's body says of them
//! is ignored, so a client cannot claim or drop another's fields.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::patch::{self, merge_key};
use crate::status::KubeError;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Field(String),
    /// An element of a keyed list, by its key as JSON (`{"name":"main"}`).
    Key(String),
}

type Path = Vec<Step>;

/// Metadata the server owns: never a manager's.
const SERVER_METADATA: [&str; 9] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "managedFields",
    "selfLink",
];

/// The leaf paths of `obj`, and each keyed element's own path.
fn fields_of(obj: &Value) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    if let Value::Object(top) = obj {
        for (k, v) in top {
            match k.as_str() {
                "apiVersion" | "kind" | "status" => {}
                "metadata" => {
                    if let Value::Object(meta) = v {
                        for (mk, mv) in meta {
                            if !SERVER_METADATA.contains(&mk.as_str()) {
                                let path = vec![Step::Field(k.clone()), Step::Field(mk.clone())];
                                walk(mv, path, &mut out);
                            }
                        }
                    }
                }
                _ => walk(v, vec![Step::Field(k.clone())], &mut out),
            }
        }
    }
    out
}

fn walk(v: &Value, path: Path, out: &mut BTreeSet<Path>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                let mut p = path.clone();
                p.push(Step::Field(k.clone()));
                walk(child, p, out);
            }
        }
        Value::Array(items) => match keyed(&path, items) {
            Some(key) => {
                for item in items {
                    let mut p = path.clone();
                    p.push(Step::Key(json!({key: item[key]}).to_string()));
                    out.insert(p.clone());
                    walk(item, p, out);
                }
            }
            None => {
                out.insert(path);
            }
        },
        _ => {
            out.insert(path);
        }
    }
}

/// The merge key of the list at `path`, when every element carries it.
fn keyed(path: &Path, items: &[Value]) -> Option<&'static str> {
    let Some(Step::Field(field)) = path.last() else {
        return None;
    };
    let key = merge_key(field)?;
    items.iter().all(|i| i.get(key).is_some()).then_some(key)
}

/// The value at `path` in `obj`.
fn value_at<'a>(obj: &'a Value, path: &Path) -> Option<&'a Value> {
    let mut at = obj;
    for step in path {
        at = match step {
            Step::Field(k) => at.get(k)?,
            Step::Key(k) => {
                let key: Map<String, Value> = serde_json::from_str(k).ok()?;
                at.as_array()?
                    .iter()
                    .find(|i| key.iter().all(|(kk, kv)| i.get(kk) == Some(kv)))?
            }
        };
    }
    Some(at)
}

/// Removes what `path` names from `obj`.
fn remove_at(obj: &mut Value, path: &Path) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut at = obj;
    for step in parent {
        let next = match step {
            Step::Field(k) => at.get_mut(k),
            Step::Key(k) => {
                let Ok(key) = serde_json::from_str::<Map<String, Value>>(k) else {
                    return;
                };
                at.as_array_mut().and_then(|items| {
                    items
                        .iter_mut()
                        .find(|i| key.iter().all(|(kk, kv)| i.get(kk) == Some(kv)))
                })
            }
        };
        let Some(next) = next else { return };
        at = next;
    }
    match last {
        Step::Field(k) => {
            if let Value::Object(m) = at {
                m.remove(k);
            }
        }
        Step::Key(k) => {
            if let (Ok(key), Value::Array(items)) =
                (serde_json::from_str::<Map<String, Value>>(k), at)
            {
                items.retain(|i| !key.iter().all(|(kk, kv)| i.get(kk) == Some(kv)));
            }
        }
    }
}

/// `.spec.containers[name="main"].image`, as conflicts are reported.
fn display(path: &Path) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Field(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Key(k) => {
                let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = key.iter().map(|(kk, kv)| format!("{kk}={kv}")).collect();
                out.push_str(&format!("[{}]", parts.join(",")));
            }
        }
    }
    out
}

/// `fieldsV1`: `{"f:spec": {"f:replicas": {}}}`, a keyed element's own
/// entry as `"."`.
fn to_fields_v1(set: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for path in set {
        insert_path(&mut root, path);
    }
    Value::Object(root)
}

fn insert_path(at: &mut Map<String, Value>, path: &[Step]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let name = match first {
        Step::Field(k) => format!("f:{k}"),
        Step::Key(k) => format!("k:{k}"),
    };
    if let Value::Object(m) = at.entry(name).or_insert_with(|| json!({})) {
        if rest.is_empty() && matches!(first, Step::Key(_)) {
            m.insert(".".into(), json!({}));
        }
        insert_path(m, rest);
    }
}

fn from_fields_v1(v: &Value, path: Path, out: &mut BTreeSet<Path>) {
    let Value::Object(m) = v else { return };
    if m.is_empty() && !path.is_empty() {
        out.insert(path);
        return;
    }
    for (k, child) in m {
        if k == "." {
            out.insert(path.clone());
            continue;
        }
        let step = if let Some(f) = k.strip_prefix("f:") {
            Step::Field(f.to_string())
        } else if let Some(key) = k.strip_prefix("k:") {
            Step::Key(key.to_string())
        } else {
            // `v:` (set members) and `i:` (indices) are never written here.
            continue;
        };
        let mut p = path.clone();
        p.push(step);
        from_fields_v1(child, p, out);
    }
}

/// One `managedFields` entry.
#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    apply: bool,
    api_version: String,
    time: String,
    fields: BTreeSet<Path>,
}

impl Entry {
    fn same_owner(&self, manager: &str, apply: bool) -> bool {
        self.manager == manager && self.apply == apply
    }
}

fn entries_of(obj: &Value) -> Vec<Entry> {
    let list = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array);
    list.into_iter()
        .flatten()
        .filter_map(|e| {
            let mut fields = BTreeSet::new();
            from_fields_v1(e.get("fieldsV1")?, Vec::new(), &mut fields);
            Some(Entry {
                manager: e.get("manager")?.as_str()?.to_string(),
                apply: e.get("operation")?.as_str()? == "Apply",
                api_version: e["apiVersion"].as_str().unwrap_or_default().to_string(),
                time: e["time"].as_str().unwrap_or_default().to_string(),
                fields,
            })
        })
        .collect()
}

fn set_entries(obj: &mut Value, entries: Vec<Entry>) {
    let list: Vec<Value> = entries
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            json!({"manager": e.manager,
                   "operation": if e.apply { "Apply" } else { "Update" },
                   "apiVersion": e.api_version, "time": e.time,
                   "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(&e.fields)})
        })
        .collect();
    if let Some(Value::Object(meta)) = obj.get_mut("metadata") {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

/// Checks a `fieldManager`: upstream's bound, printable.
pub fn check_manager(manager: &str) -> Result<(), KubeError> {
    if manager.is_empty() || manager.len() > 128 || manager.chars().any(char::is_control) {
        return Err(KubeError::bad_request(
            "fieldManager must be 1 to 128 printable characters",
        ));
    }
    Ok(())
}

/// Records an update by `manager` from `old` (none for a create) to
/// `new`: it owns the leaves it changed, taken from everyone else, and
/// leaves that are gone are no one's.
pub fn record_update(old: Option<&Value>, new: &mut Value, manager: &str, now: &str) {
    let mut entries = old.map(entries_of).unwrap_or_default();
    let now_fields = fields_of(new);
    let changed: BTreeSet<Path> = now_fields
        .iter()
        .filter(|p| old.and_then(|o| value_at(o, p)) != value_at(new, p))
        .cloned()
        .collect();
    for e in &mut entries {
        e.fields
            .retain(|p| now_fields.contains(p) && !changed.contains(p));
    }
    if !changed.is_empty() {
        let api_version = new["apiVersion"].as_str().unwrap_or_default().to_string();
        match entries.iter_mut().find(|e| e.same_owner(manager, false)) {
            Some(e) => {
                e.fields.extend(changed);
                e.time = now.to_string();
                e.api_version = api_version;
            }
            None => entries.push(Entry {
                manager: manager.to_string(),
                apply: false,
                api_version,
                time: now.to_string(),
                fields: changed,
            }),
        }
    }
    merge_ancient_updates(&mut entries);
    set_entries(new, entries);
}

/// Most update managers an object records, as upstream: past it, the
/// oldest are merged into one, `ancient-changes`, so no run of writes
/// under new `fieldManager` names grows an object without end.
const MAX_UPDATE_MANAGERS: usize = 10;
/// Most appliers an object records: one more is refused.
const MAX_APPLY_MANAGERS: usize = 32;
const ANCIENT: &str = "ancient-changes";

fn merge_ancient_updates(entries: &mut Vec<Entry>) {
    let updates = entries.iter().filter(|e| !e.apply).count();
    if updates <= MAX_UPDATE_MANAGERS {
        return;
    }
    // Oldest first (RFC 3339 times sort as text), the merged one among them.
    let mut order: Vec<usize> = (0..entries.len()).filter(|i| !entries[*i].apply).collect();
    order.sort_by(|a, b| entries[*a].time.cmp(&entries[*b].time));
    let merged: Vec<usize> = order[..updates - MAX_UPDATE_MANAGERS + 1].to_vec();
    let mut ancient = Entry {
        manager: ANCIENT.into(),
        apply: false,
        api_version: String::new(),
        time: String::new(),
        fields: BTreeSet::new(),
    };
    for i in &merged {
        let e = &entries[*i];
        ancient.fields.extend(e.fields.iter().cloned());
        ancient.time = ancient.time.clone().max(e.time.clone());
        ancient.api_version.clone_from(&e.api_version);
    }
    let rest = std::mem::take(entries)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !merged.contains(i))
        .map(|(_, e)| e);
    *entries = std::iter::once(ancient).chain(rest).collect();
}

/// Server-side apply of `applied` by `manager` over `live` (none: the
/// object is made from it). A conflict names each field and who owns it.
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    now: &str,
) -> Result<Value, KubeError> {
    let mut entries = live.map(entries_of).unwrap_or_default();
    let appliers = entries.iter().filter(|e| e.apply).count();
    if appliers >= MAX_APPLY_MANAGERS && !entries.iter().any(|e| e.same_owner(manager, true)) {
        return Err(KubeError::bad_request(format!(
            "the object already has {MAX_APPLY_MANAGERS} field managers applying to it: apply as one of them"
        )));
    }
    let wanted = fields_of(applied);
    let mut conflicts = Vec::new();
    if let Some(live) = live {
        for e in entries.iter_mut().filter(|e| !e.same_owner(manager, true)) {
            let contested: Vec<Path> = wanted
                .iter()
                .filter(|p| e.fields.contains(*p))
                .filter(|p| value_at(live, p) != value_at(applied, p))
                .filter(|p| !matches!(p.last(), Some(Step::Key(_))))
                .cloned()
                .collect();
            if force {
                e.fields.retain(|p| !contested.contains(p));
            } else {
                conflicts.extend(contested.into_iter().map(|p| (e.manager.clone(), p)));
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflict(&conflicts));
    }
    let mut merged = match live {
        Some(l) => {
            let mut doc = l.clone();
            let mut config = applied.clone();
            if let Some(Value::Object(m)) = config.get_mut("metadata") {
                m.remove("managedFields");
            }
            patch::strategic(&mut doc, &config)?;
            doc
        }
        None => applied.clone(),
    };
    let before = entries
        .iter()
        .position(|e| e.same_owner(manager, true))
        .map(|i| entries.remove(i).fields)
        .unwrap_or_default();
    let others: BTreeSet<&Path> = entries.iter().flat_map(|e| e.fields.iter()).collect();
    // Deepest first, so an element goes after its fields were weighed.
    let dropped: Vec<&Path> = before.difference(&wanted).collect();
    for dropped in dropped.into_iter().rev() {
        let still_owned = others.iter().any(|p| p.starts_with(dropped));
        if !still_owned {
            remove_at(&mut merged, dropped);
        }
    }
    entries.push(Entry {
        manager: manager.to_string(),
        apply: true,
        api_version: applied["apiVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        time: now.to_string(),
        fields: wanted,
    });
    set_entries(&mut merged, entries);
    Ok(merged)
}

fn conflict(conflicts: &[(String, Path)]) -> KubeError {
    let n = conflicts.len();
    let listed: Vec<String> = conflicts
        .iter()
        .map(|(m, p)| format!("conflict with {m:?}: {}", display(p)))
        .collect();
    let mut e = KubeError::new(
        409,
        "Conflict",
        format!(
            "Apply failed with {n} conflict{}: {}",
            if n == 1 { "" } else { "s" },
            listed.join("\n")
        ),
    );
    e.causes = conflicts
        .iter()
        .map(|(m, p)| (format!("conflict with {m:?}"), display(p)))
        .collect();
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = "2026-01-01T00:00:00Z";

    fn config(level: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "settings", "labels": {"app": "demo"}},
               "data": {"level": level, "mode": "fast"}})
    }

    fn managers(obj: &Value) -> Vec<(String, String)> {
        obj["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["manager"].as_str().unwrap().to_string(),
                    e["operation"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn a_second_applier_conflicts_on_a_field_it_would_change_unless_forced() {
        let made = apply(None, &config("3"), "alice", false, T0).unwrap();
        assert_eq!(made["data"]["level"], "3");
        assert_eq!(
            made["metadata"]["managedFields"][0]["fieldsV1"]["f:data"]["f:level"],
            json!({})
        );
        // The same value is shared ownership, not a conflict.
        let shared = apply(Some(&made), &config("3"), "bob", false, T0).unwrap();
        assert_eq!(managers(&shared).len(), 2);
        let refused = apply(Some(&made), &config("4"), "bob", false, T0).unwrap_err();
        assert_eq!(refused.code, 409);
        assert_eq!(
            refused.message,
            "Apply failed with 1 conflict: conflict with \"alice\": .data.level"
        );
        let forced = apply(Some(&made), &config("4"), "bob", true, T0).unwrap();
        assert_eq!(forced["data"]["level"], "4");
        let alice = &forced["metadata"]["managedFields"][0];
        assert_eq!(alice["manager"], "alice");
        assert!(alice["fieldsV1"]["f:data"].get("f:level").is_none());
        assert!(alice["fieldsV1"]["f:data"].get("f:mode").is_some());
    }

    #[test]
    fn a_field_no_longer_applied_goes_unless_someone_else_owns_it() {
        let made = apply(None, &config("3"), "alice", false, T0).unwrap();
        let mut fewer = config("3");
        fewer["data"].as_object_mut().unwrap().remove("mode");
        let pruned = apply(Some(&made), &fewer, "alice", false, T0).unwrap();
        assert!(pruned["data"].get("mode").is_none(), "{pruned}");
        // bob's update of `mode` keeps it past alice's dropping it.
        let mut edited = made.clone();
        edited["data"]["mode"] = json!("slow");
        record_update(Some(&made), &mut edited, "bob", T0);
        assert_eq!(
            managers(&edited),
            [
                ("alice".into(), "Apply".into()),
                ("bob".into(), "Update".into())
            ]
        );
        let kept = apply(Some(&edited), &fewer, "alice", false, T0).unwrap();
        assert_eq!(kept["data"]["mode"], "slow");
        // And alice re-applying `mode` now conflicts with bob's update.
        let e = apply(Some(&edited), &config("3"), "alice", false, T0).unwrap_err();
        assert!(
            e.message.contains("conflict with \"bob\": .data.mode"),
            "{}",
            e.message
        );
    }

    #[test]
    fn keyed_list_elements_are_owned_by_key_and_reported_by_it() {
        let deploy = |image: &str| {
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "api"},
                   "spec": {"template": {"spec": {"containers": [
                       {"name": "main", "image": image}]}}}})
        };
        let made = apply(None, &deploy("a:1"), "alice", false, T0).unwrap();
        let v1 = &made["metadata"]["managedFields"][0]["fieldsV1"];
        let main = &v1["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"main\"}"];
        assert_eq!(main["."], json!({}));
        assert_eq!(main["f:image"], json!({}));
        let e = apply(Some(&made), &deploy("b:2"), "bob", false, T0).unwrap_err();
        assert!(
            e.message
                .ends_with(".spec.template.spec.containers[name=\"main\"].image"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_run_of_new_manager_names_does_not_grow_an_object_without_end() {
        let mut obj = apply(None, &config("0"), "alice", false, T0).unwrap();
        for i in 1..=50 {
            let mut next = obj.clone();
            next["data"][format!("k{i}")] = json!(i.to_string());
            let at = format!("2026-01-01T00:00:{:02}Z", i);
            record_update(Some(&obj), &mut next, &format!("writer-{i}"), &at);
            obj = next;
        }
        let owners = managers(&obj);
        let updates = owners.iter().filter(|(_, op)| op == "Update").count();
        assert_eq!(updates, MAX_UPDATE_MANAGERS, "{owners:?}");
        assert!(
            owners.iter().any(|(m, _)| m == "ancient-changes"),
            "{owners:?}"
        );
        assert!(
            owners.iter().any(|(m, _)| m == "writer-50"),
            "the newest is kept"
        );
        // Appliers are bounded too (alice is one): one past the bound is refused.
        for i in 1..MAX_APPLY_MANAGERS {
            obj = apply(Some(&obj), &config("0"), &format!("applier-{i}"), false, T0).unwrap();
        }
        let e = apply(Some(&obj), &config("0"), "one-more", false, T0).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(apply(Some(&obj), &config("0"), "applier-1", false, T0).is_ok());
    }

    #[test]
    fn what_a_body_says_of_managed_fields_is_ignored() {
        let made = apply(None, &config("3"), "alice", false, T0).unwrap();
        let mut forged = made.clone();
        forged["metadata"]["managedFields"] = json!([{"manager": "mallory", "operation": "Apply",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:level": {}}}}]);
        forged["data"]["level"] = json!("9");
        record_update(Some(&made), &mut forged, "mallory-edit", T0);
        let owners = managers(&forged);
        assert!(!owners.iter().any(|(m, _)| m == "mallory"), "{owners:?}");
        assert!(check_manager("").is_err());
        assert!(check_manager("x\ny").is_err());
        assert!(check_manager(&"m".repeat(129)).is_err());
    }
}
