//! `/openapi/v3`: the index of group versions, and for each one a document
//! of its paths and the schemas of the types it serves, generated from
//! k8s-openapi's v1.37 types (the same definitions, descriptions and
//! names — `io.k8s.api.apps.v1.DeploymentSpec` — as upstream's). kubectl
//! reads it for `explain` and to check fields before `apply`. `/openapi/v2`
//! is the same, rewritten as one Swagger 2.0 document.
//!
//! A `$ref` beside a description is wrapped in `allOf`, as upstream's
//! documents do (OpenAPI 3.0 ignores a `$ref`'s siblings). The documents
//! depend on nothing but the served types: each is built once.

use std::borrow::Cow;
use std::sync::OnceLock;

use k8s_openapi::api::{apps::v1 as apps, batch::v1 as batch, core::v1 as core, rbac::v1 as rbac};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiextensions;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::crd::Custom;
use crate::resource::{Catalog, ResourceType};

/// `api/v1`, then `apis/<group>/<version>` of each named group's versions.
fn group_versions(catalog: &Catalog) -> Vec<String> {
    let mut out = vec!["api/v1".to_string()];
    for (g, versions) in catalog.groups() {
        out.extend(versions.into_iter().map(|v| format!("apis/{g}/{v}")));
    }
    out
}

/// `/openapi/v3`: one document per group version served.
pub fn index(catalog: &Catalog) -> Value {
    let mut paths = Map::new();
    for gv in group_versions(catalog) {
        let url = format!("/openapi/v3/{gv}?hash={}", hash_of(catalog, &gv));
        paths.insert(gv, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

/// A stable tag of a document's content, so a client's cache of it is
/// kept until the types change (a release, or a definition's update).
fn hash_of(catalog: &Catalog, gv: &str) -> String {
    let text = document(catalog, gv)
        .map(|d| d.to_string())
        .unwrap_or_default();
    // FNV-1a: a cache key, not a security boundary.
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016X}")
}

/// The document of `gv` (`api/v1` or `apis/apps/v1`), if it is served:
/// a built-in group's built once, a definition's each time asked.
pub fn document(catalog: &Catalog, gv: &str) -> Option<Cow<'static, Value>> {
    static DOCS: OnceLock<Vec<(String, Value)>> = OnceLock::new();
    let gv = gv.trim_end_matches('/');
    let docs = DOCS.get_or_init(|| {
        group_versions(&Catalog::default())
            .into_iter()
            .filter_map(|gv| build(&Catalog::default(), &gv).map(|d| (gv, d)))
            .collect()
    });
    if let Some((_, d)) = docs.iter().find(|(g, _)| g == gv) {
        return Some(Cow::Borrowed(d));
    }
    build(catalog, gv).map(Cow::Owned)
}

/// A custom resource's schema as upstream publishes it: its definition's,
/// with `apiVersion`, `kind` and the standard `metadata`.
fn custom_schema(gen: &mut SchemaGenerator, r: &ResourceType, custom: &Custom) -> Value {
    let meta = gen.subschema_for::<ObjectMeta>().to_value();
    let mut schema = custom.schema.clone();
    let described = |d: &str| json!({"description": d, "type": "string"});
    if let Some(props) = schema
        .as_object_mut()
        .map(|s| s.entry("properties").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
    {
        props.insert(
            "apiVersion".into(),
            described(
                "APIVersion defines the versioned schema of this representation of an object.",
            ),
        );
        props.insert(
            "kind".into(),
            described(
                "Kind is a string value representing the REST resource this object represents.",
            ),
        );
        props.insert(
            "metadata".into(),
            json!({"allOf": [meta], "description": "Standard object's metadata."}),
        );
    }
    let reversed: Vec<&str> = r.group.rsplit('.').collect();
    let name = format!("{}.{}.{}", reversed.join("."), r.version, r.kind);
    gen.definitions_mut().insert(name.clone(), schema);
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The schema of `r`'s kind, registered in `gen`'s definitions.
fn schema_of(gen: &mut SchemaGenerator, r: &ResourceType) -> Option<Value> {
    fn of<T: JsonSchema>(gen: &mut SchemaGenerator) -> Value {
        gen.subschema_for::<T>().to_value()
    }
    if let Some(custom) = &r.custom {
        return Some(custom_schema(gen, r, custom));
    }
    Some(match (r.group.as_ref(), r.kind.as_ref()) {
        ("", "Namespace") => of::<core::Namespace>(gen),
        ("", "Node") => of::<core::Node>(gen),
        ("", "ConfigMap") => of::<core::ConfigMap>(gen),
        ("", "Secret") => of::<core::Secret>(gen),
        ("", "Pod") => of::<core::Pod>(gen),
        ("", "Event") => of::<core::Event>(gen),
        ("", "ServiceAccount") => of::<core::ServiceAccount>(gen),
        ("", "Service") => of::<core::Service>(gen),
        ("", "ResourceQuota") => of::<core::ResourceQuota>(gen),
        ("", "Endpoints") => of::<core::Endpoints>(gen),
        ("apps", "Deployment") => of::<apps::Deployment>(gen),
        ("apps", "ReplicaSet") => of::<apps::ReplicaSet>(gen),
        ("apps", "StatefulSet") => of::<apps::StatefulSet>(gen),
        ("batch", "Job") => of::<batch::Job>(gen),
        ("rbac.authorization.k8s.io", "Role") => of::<rbac::Role>(gen),
        ("rbac.authorization.k8s.io", "ClusterRole") => of::<rbac::ClusterRole>(gen),
        ("rbac.authorization.k8s.io", "RoleBinding") => of::<rbac::RoleBinding>(gen),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => of::<rbac::ClusterRoleBinding>(gen),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            of::<apiextensions::CustomResourceDefinition>(gen)
        }
        ("atrium.dev", "InferenceService") => {
            // Its own schema beside the metadata it refers to.
            gen.subschema_for::<ObjectMeta>();
            let name = "dev.atrium.v1.InferenceService";
            gen.definitions_mut()
                .insert(name.into(), crate::inference::schema());
            json!({"$ref": format!("#/components/schemas/{name}")})
        }
        _ => return None,
    })
}

fn build(catalog: &Catalog, gv: &str) -> Option<Value> {
    let (group, version) = match gv.split('/').collect::<Vec<_>>().as_slice() {
        ["api", v] => ("", *v),
        ["apis", g, v] => (*g, *v),
        _ => return None,
    };
    let mut gen = SchemaSettings::openapi3().into_generator();
    let mut paths = Map::new();
    let mut kinds = Vec::new();
    for r in catalog
        .all()
        .filter(|r| r.group == group && r.version == version)
    {
        let schema = schema_of(&mut gen, r)?;
        paths.extend(paths_of(gv, r, &schema));
        kinds.push((schema, r));
    }
    if paths.is_empty() {
        return None;
    }
    let mut schemas = gen.take_definitions(true);
    for (schema, r) in kinds {
        let name = schema["$ref"]
            .as_str()
            .and_then(|s| s.rsplit('/').next())
            .unwrap_or_default();
        if let Some(Value::Object(def)) = schemas.get_mut(name) {
            def.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": r.group, "version": r.version, "kind": r.kind}]),
            );
        }
    }
    let (major, minor) = crate::KUBERNETES_VERSION;
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Atrium tenant cluster", "version": format!("v{major}.{minor}.0")},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// `/openapi/v2`: one Swagger 2.0 document of every group version served,
/// for the clients that still read it (kubectl reads v3 first). It is the
/// v3 documents rewritten: schemas under `definitions`, a response's
/// schema beside its description, a parameter's type on the parameter;
/// what 2.0 cannot say (`nullable`, `oneOf`, `anyOf`, `not`) is left out,
/// as upstream leaves it out of its own v2, so the document describes no
/// more than the v3 one and the server still checks every write.
pub fn swagger(catalog: &Catalog) -> Value {
    // The built-in groups' part is rewritten once; a cluster's own types
    // (never in a built-in group) are added to a copy of it.
    static BUILT_IN: OnceLock<(Vec<String>, Value)> = OnceLock::new();
    let (built_in_groups, built_in) = BUILT_IN.get_or_init(|| {
        let catalog = Catalog::default();
        let groups = group_versions(&catalog);
        let mut doc = json!({"paths": {}, "definitions": {}});
        add_swagger_groups(&mut doc, &catalog, &groups);
        (groups, doc)
    });
    let mut doc = built_in.clone();
    let own: Vec<String> = group_versions(catalog)
        .into_iter()
        .filter(|gv| !built_in_groups.contains(gv))
        .collect();
    add_swagger_groups(&mut doc, catalog, &own);
    let (major, minor) = crate::KUBERNETES_VERSION;
    doc["swagger"] = json!("2.0");
    doc["info"] =
        json!({"title": "Atrium tenant cluster", "version": format!("v{major}.{minor}.0")});
    doc["consumes"] = json!(["application/json"]);
    doc["produces"] = json!(["application/json"]);
    doc
}

/// The paths and definitions of group versions `gvs`, rewritten as 2.0's,
/// into `doc`.
fn add_swagger_groups(doc: &mut Value, catalog: &Catalog, gvs: &[String]) {
    for gv in gvs {
        let Some(v3) = document(catalog, gv) else {
            continue;
        };
        let mut v3 = v3.into_owned();
        if let (Some(schemas), Some(definitions)) = (
            v3["components"]["schemas"].as_object_mut(),
            doc["definitions"].as_object_mut(),
        ) {
            schemas.values_mut().for_each(swagger_schema);
            definitions.append(schemas);
        }
        if let (Some(p), Some(paths)) = (v3["paths"].as_object_mut(), doc["paths"].as_object_mut())
        {
            for item in p.values_mut().filter_map(Value::as_object_mut) {
                for (key, part) in item.iter_mut() {
                    match key.as_str() {
                        "parameters" => swagger_parameters(part),
                        _ => swagger_operation(part),
                    }
                }
            }
            paths.append(p);
        }
    }
}

/// Rewrites a v3 schema into 2.0's terms, in place: the keywords, then
/// each schema inside it (never a property merely named `not`).
fn swagger_schema(schema: &mut Value) {
    let Value::Object(map) = schema else {
        return;
    };
    for gone in ["nullable", "oneOf", "anyOf", "not"] {
        map.remove(gone);
    }
    if let Some(Value::String(r)) = map.get_mut("$ref") {
        if let Some(name) = r.strip_prefix("#/components/schemas/") {
            *r = format!("#/definitions/{name}");
        }
    }
    for (key, inner) in map.iter_mut() {
        match (key.as_str(), inner) {
            ("properties" | "patternProperties", Value::Object(props)) => {
                props.values_mut().for_each(swagger_schema);
            }
            ("allOf", Value::Array(all)) => all.iter_mut().for_each(swagger_schema),
            ("items" | "additionalProperties", inner) => swagger_schema(inner),
            _ => {}
        }
    }
}

/// v3 parameters as 2.0 writes them: the type on the parameter.
fn swagger_parameters(params: &mut Value) {
    let Value::Array(params) = params else {
        return;
    };
    for p in params.iter_mut().filter_map(Value::as_object_mut) {
        if let Some(Value::Object(schema)) = p.remove("schema") {
            p.extend(schema);
        }
    }
}

/// A v3 operation as 2.0 writes it.
fn swagger_operation(op: &mut Value) {
    let Value::Object(op) = op else {
        return;
    };
    if let Some(params) = op.get_mut("parameters") {
        swagger_parameters(params);
    }
    if let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) {
        for answer in responses.values_mut().filter_map(Value::as_object_mut) {
            if let Some(mut content) = answer.remove("content") {
                let mut schema = content["application/json"]["schema"].take();
                swagger_schema(&mut schema);
                answer.insert("schema".into(), schema);
            }
        }
    }
}

/// Each resource's collection and object paths, their operations tagged
/// with the kind they serve, the query parameters they take and the
/// schema they answer with.
fn paths_of(gv: &str, r: &ResourceType, schema: &Value) -> Map<String, Value> {
    let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
    let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string"}});
    let write_params = json!([
        query("dryRun"),
        query("fieldManager"),
        query("fieldValidation")
    ]);
    let answer = json!({"200": {"description": "OK",
        "content": {"application/json": {"schema": schema}}}});
    let op = |verb: &str, params: Value| {
        json!({"operationId": format!("{verb}{}", r.kind), "parameters": params,
               "x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": verb,
               "responses": answer})
    };
    let base = if r.namespaced {
        format!("/{gv}/namespaces/{{namespace}}/{}", r.plural)
    } else {
        format!("/{gv}/{}", r.plural)
    };
    // The names in a path, declared once per path as upstream does.
    let in_path = |name: &str| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}});
    let (mut collection_params, mut object_params) = (Vec::new(), vec![in_path("name")]);
    if r.namespaced {
        collection_params.push(in_path("namespace"));
        object_params.push(in_path("namespace"));
    }
    let (mut collection, mut object) = if r.read_only() {
        (
            json!({"get": op("list", json!([query("labelSelector")]))}),
            json!({"get": op("get", json!([]))}),
        )
    } else {
        (
            json!({"get": op("list", json!([query("labelSelector"), query("fieldSelector"),
                       query("watch"), query("resourceVersion"), query("limit"), query("continue")])),
                   "post": op("post", write_params.clone())}),
            json!({"get": op("get", json!([])), "put": op("put", write_params.clone()),
                   "patch": op("patch", write_params),
                   "delete": op("delete", json!([query("dryRun")]))}),
        )
    };
    if !collection_params.is_empty() {
        collection["parameters"] = Value::Array(collection_params);
    }
    object["parameters"] = Value::Array(object_params);
    let mut paths = Map::new();
    paths.insert(base.clone(), collection);
    paths.insert(format!("{base}/{{name}}"), object);
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_kind_has_its_schema_tagged_with_its_kind() {
        for r in crate::SERVED {
            let gv = if r.group.is_empty() {
                format!("api/{}", r.version)
            } else {
                format!("apis/{}/{}", r.group, r.version)
            };
            let doc = document(&Catalog::default(), &gv).unwrap();
            let tagged = doc["components"]["schemas"]
                .as_object()
                .unwrap()
                .values()
                .filter(|s| s["x-kubernetes-group-version-kind"][0]["kind"] == r.kind.as_ref())
                .count();
            assert_eq!(tagged, 1, "{}", r.kind);
        }
        assert!(
            index(&Catalog::default())["paths"]["apis/apps/v1"]["serverRelativeURL"]
                .as_str()
                .unwrap()
                .starts_with("/openapi/v3/apis/apps/v1?hash=")
        );
        assert!(document(&Catalog::default(), "apis/widgets/v1").is_none());
    }

    #[test]
    fn the_v2_document_is_swagger_with_every_kind_and_no_v3_left_in_it() {
        let doc = swagger(&Catalog::default());
        assert_eq!(doc["swagger"], "2.0");
        assert!(!doc.to_string().contains("#/components/"));
        let definitions = doc["definitions"].as_object().unwrap();
        let mut v3_words = Vec::new();
        definitions
            .values()
            .for_each(|s| keywords(s, &mut v3_words));
        assert_eq!(v3_words, Vec::<String>::new(), "2.0 has no such keywords");
        // Properties of those names are properties, and stay.
        let props = &definitions
            ["io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JSONSchemaProps"]
            ["properties"];
        assert!(props["not"].is_object() && props["nullable"].is_object());
        for r in crate::SERVED {
            let tagged = definitions
                .values()
                .filter(|s| s["x-kubernetes-group-version-kind"][0]["kind"] == r.kind.as_ref())
                .count();
            assert_eq!(tagged, 1, "{}", r.kind);
        }
        // Every reference resolves inside the document.
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(refs.len() > 100);
        for r in refs {
            let name = r.strip_prefix("#/definitions/").unwrap();
            assert!(definitions.contains_key(name), "{r}");
        }
        let create = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments"]["post"];
        assert_eq!(create["parameters"][0]["type"], "string");
        assert_eq!(
            create["responses"]["200"]["schema"]["$ref"],
            "#/definitions/io.k8s.api.apps.v1.Deployment"
        );
    }

    /// The 3.0-only keywords used anywhere in `schema`.
    fn keywords(schema: &Value, out: &mut Vec<String>) {
        let Value::Object(map) = schema else { return };
        for word in ["nullable", "oneOf", "anyOf", "not"] {
            if map.contains_key(word) {
                out.push(word.into());
            }
        }
        for (key, inner) in map {
            match (key.as_str(), inner) {
                ("properties", Value::Object(p)) => p.values().for_each(|s| keywords(s, out)),
                ("allOf", Value::Array(a)) => a.iter().for_each(|s| keywords(s, out)),
                ("items" | "additionalProperties", s) => keywords(s, out),
                _ => {}
            }
        }
    }

    fn collect_refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| collect_refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn a_deployments_spec_is_upstreams_with_refs_wrapped_as_upstream_wraps_them() {
        let doc = document(&Catalog::default(), "apis/apps/v1").unwrap();
        let schemas = &doc["components"]["schemas"];
        let spec = &schemas["io.k8s.api.apps.v1.DeploymentSpec"];
        assert!(spec["description"]
            .as_str()
            .unwrap()
            .contains("desired behavior of the Deployment"));
        let selector = &spec["properties"]["selector"];
        assert_eq!(
            selector["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"
        );
        assert!(selector.get("$ref").is_none(), "{selector}");
        assert!(schemas["io.k8s.api.core.v1.PodTemplateSpec"].is_object());
        let replicas = &spec["properties"]["replicas"];
        assert_eq!(replicas["type"], "integer");
    }
}
