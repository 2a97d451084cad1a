//! Discovery: `/version`, `/api`, `/apis` and each group version's
//! resource list, in the legacy (unaggregated) shapes every client
//! understands, and aggregated (`apidiscovery.k8s.io/v2`): every group's
//! resources in one answer to `/api` and one to `/apis`, which kubectl
//! asks for first — two requests instead of one per group version.

use serde_json::{json, Value};

use crate::resource::{Catalog, ResourceType};
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

fn group(name: &str, versions: &[&str]) -> Value {
    let gv = |v: &str| json!({"groupVersion": format!("{name}/{v}"), "version": v});
    let all: Vec<Value> = versions.iter().map(|v| gv(v)).collect();
    json!({"name": name, "versions": all, "preferredVersion": gv(versions.first().copied().unwrap_or_default())})
}

/// `/apis`: every named group.
pub fn api_group_list(catalog: &Catalog) -> Value {
    let groups: Vec<Value> = catalog
        .groups()
        .into_iter()
        .map(|(g, v)| group(g, &v))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`: one group, if served.
pub fn api_group(catalog: &Catalog, name: &str) -> Option<Value> {
    let (g, v) = catalog.groups().into_iter().find(|(g, _)| *g == name)?;
    let mut doc = group(g, &v);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// A served subresource: its name, what it answers with (group,
/// version, kind) and its verbs.
type Subresource<'a> = (
    &'static str,
    (&'a str, &'a str, &'a str),
    &'static [&'static str],
);

/// The subresources of `r`'s kind.
fn subresources(r: &ResourceType) -> Vec<Subresource<'_>> {
    let own = (r.group.as_ref(), r.version.as_ref(), r.kind.as_ref());
    let mut out: Vec<Subresource> = Vec::new();
    if r.status_is_separate() {
        let verbs: &[&str] = if r.custom.is_some() {
            &["get", "patch", "update"]
        } else {
            &["get"]
        };
        out.push(("status", own, verbs));
    }
    if r.scalable() {
        out.push((
            "scale",
            ("autoscaling", "v1", "Scale"),
            &["get", "patch", "update"],
        ));
    }
    match (r.custom.is_none(), r.kind.as_ref()) {
        (true, "Pod") => {
            out.push(("log", ("", "v1", "Pod"), &["get"]));
            out.push(("exec", ("", "v1", "PodExecOptions"), &["create", "get"]));
        }
        (true, "ServiceAccount") => {
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
        "shortNames": r.short_names(),
        "categories": r.categories(),
    })];
    for (sub, (group, version, kind), verbs) in subresources(r) {
        let mut entry = json!({"name": format!("{}/{sub}", r.plural), "singularName": "",
            "namespaced": r.namespaced, "kind": kind, "verbs": verbs});
        if (group, version) != (r.group.as_ref(), r.version.as_ref()) {
            entry["group"] = json!(group);
            entry["version"] = json!(version);
        }
        out.push(entry);
    }
    out
}

/// The media type of aggregated discovery, as answered.
pub const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

fn aggregated_resource(r: &ResourceType) -> Value {
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
        "shortNames": r.short_names(),
        "categories": r.categories(),
        "subresources": subs,
    })
}

/// `/api` (`core`) or `/apis` as one aggregated document.
pub fn aggregated(catalog: &Catalog, core: bool) -> Value {
    let wanted: Vec<(&str, Vec<&str>)> = if core {
        vec![("", vec!["v1"])]
    } else {
        catalog.groups()
    };
    let items: Vec<Value> = wanted
        .into_iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .into_iter()
                .map(|version| {
                    let resources: Vec<Value> = catalog
                        .all()
                        .filter(|r| r.group == group && r.version == version)
                        .map(aggregated_resource)
                        .collect();
                    json!({"version": version, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": group}, "versions": versions})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
           "metadata": {}, "items": items})
}

/// `/api/v1` or `/apis/{group}/{version}`: its resources, if served.
pub fn api_resource_list(catalog: &Catalog, group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = catalog
        .all()
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
        let list = api_resource_list(&Catalog::default(), "", "v1").unwrap();
        assert_eq!(list["groupVersion"], "v1");
        let cm = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "configmaps")
            .unwrap();
        assert_eq!(cm["shortNames"], json!(["cm"]));
        assert_eq!(cm["namespaced"], true);
        assert!(api_resource_list(&Catalog::default(), "", "v2").is_none());
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
        let apis = aggregated(&Catalog::default(), false);
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
        let core = aggregated(&Catalog::default(), true);
        assert_eq!(core["items"][0]["metadata"]["name"], "");
        assert_eq!(core["items"][0]["versions"][0]["version"], "v1");
    }
}
