//! Discovery: `/version`, `/api`, `/apis` and each group version's
//! resource list, in the legacy (unaggregated) shapes every client
//! understands, and aggregated (`apidiscovery.k8s.io/v2`): every group's
//! resources in one answer to `/api` and one to `/apis`, which kubectl
//! asks for first — two requests instead of one per group version.

use serde_json::{json, Value};

use crate::resource::{groups, ResourceType, SERVED};
use crate::KUBERNETES_VERSION;

pub fn version() -> Value {
    let (major, minor) = KUBERNETES_VERSION;
    json!({
        "major": major,
        "minor": minor,
        "gitVersion": format!("v{major}.{minor}.0+atrium"),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "",
        "compiler": "atrium",
        "platform": "linux/amd64",
    })
}

/// `/api`: the core group's one version.
pub fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    })
}

fn group(name: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{name}/{version}"), "version": version});
    json!({"name": name, "versions": [gv], "preferredVersion": gv})
}

/// `/apis`: every named group.
pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups().into_iter().map(|(g, v)| group(g, v)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`: one group, if served.
pub fn api_group(name: &str) -> Option<Value> {
    let (g, v) = groups().into_iter().find(|(g, _)| *g == name)?;
    let mut doc = group(g, v);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// A served subresource: its name, what it answers with (group,
/// version, kind) and its verbs.
type Subresource = (
    &'static str,
    (&'static str, &'static str, &'static str),
    &'static [&'static str],
);

/// The subresources of `r`'s kind.
fn subresources(r: &ResourceType) -> Vec<Subresource> {
    let own = (r.group, r.version, r.kind);
    let mut out: Vec<Subresource> = Vec::new();
    if crate::resource::CONTROLLED_STATUS.contains(&r.kind) {
        out.push(("status", own, &["get"]));
    }
    if crate::resource::SCALABLE.contains(&r.kind) {
        out.push((
            "scale",
            ("autoscaling", "v1", "Scale"),
            &["get", "patch", "update"],
        ));
    }
    match r.kind {
        "Pod" => {
            out.push(("log", ("", "v1", "Pod"), &["get"]));
            out.push(("exec", ("", "v1", "PodExecOptions"), &["create", "get"]));
        }
        "ServiceAccount" => {
            out.push((
                "token",
                ("authentication.k8s.io", "v1", "TokenRequest"),
                &["create"],
            ));
        }
        _ => {}
    }
    out
}

/// `r` and its subresources, as a legacy resource list has them.
fn resource(r: &ResourceType) -> Vec<Value> {
    let mut out = vec![json!({
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": r.verbs(),
        "shortNames": r.short_names,
        "categories": r.categories(),
    })];
    for (sub, (group, version, kind), verbs) in subresources(r) {
        let mut entry = json!({"name": format!("{}/{sub}", r.plural), "singularName": "",
            "namespaced": r.namespaced, "kind": kind, "verbs": verbs});
        if (group, version) != (r.group, r.version) {
            entry["group"] = json!(group);
            entry["version"] = json!(version);
        }
        out.push(entry);
    }
    out
}

/// The media type of aggregated discovery, as answered.
pub const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// `/api` (`core`) or `/apis` as one aggregated document.
pub fn aggregated(core: bool) -> Value {
    let wanted: Vec<(&str, &str)> = if core { vec![("", "v1")] } else { groups() };
    let items: Vec<Value> = wanted
        .into_iter()
        .map(|(group, version)| {
            let resources: Vec<Value> = SERVED
                .iter()
                .filter(|r| r.group == group && r.version == version)
                .map(|r| {
                    let subs: Vec<Value> = subresources(r)
                        .into_iter()
                        .map(|(sub, (g, v, k), verbs)| {
                            json!({"subresource": sub, "verbs": verbs,
                                   "responseKind": {"group": g, "version": v, "kind": k}})
                        })
                        .collect();
                    json!({
                        "resource": r.plural,
                        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
                        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                        "singularResource": r.singular,
                        "verbs": r.verbs(),
                        "shortNames": r.short_names,
                        "categories": r.categories(),
                        "subresources": subs,
                    })
                })
                .collect();
            json!({"metadata": {"name": group},
                   "versions": [{"version": version, "resources": resources, "freshness": "Current"}]})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
           "metadata": {}, "items": items})
}

/// `/api/v1` or `/apis/{group}/{version}`: its resources, if served.
pub fn api_resource_list(group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = SERVED
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .flat_map(resource)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_core_group_lists_its_resources_with_short_names() {
        let list = api_resource_list("", "v1").unwrap();
        assert_eq!(list["groupVersion"], "v1");
        let cm = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "configmaps")
            .unwrap();
        assert_eq!(cm["shortNames"], json!(["cm"]));
        assert_eq!(cm["namespaced"], true);
        assert!(api_resource_list("", "v2").is_none());
        let log = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "pods/log")
            .unwrap();
        assert_eq!(log["kind"], "Pod");
    }

    #[test]
    fn aggregated_discovery_has_every_group_with_its_subresources() {
        let apis = aggregated(false);
        let names: Vec<&str> = apis["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"apps") && names.contains(&"batch"),
            "{names:?}"
        );
        let apps = apis["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == "apps")
            .unwrap();
        let deployments = apps["versions"][0]["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resource"] == "deployments")
            .unwrap();
        assert_eq!(deployments["scope"], "Namespaced");
        let scale = deployments["subresources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["subresource"] == "scale")
            .unwrap();
        assert_eq!(scale["responseKind"]["kind"], "Scale");
        let core = aggregated(true);
        assert_eq!(core["items"][0]["metadata"]["name"], "");
        assert_eq!(core["items"][0]["versions"][0]["version"], "v1");
    }
}
