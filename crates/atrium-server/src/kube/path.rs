//! What a path under `/k8s/{cluster}/` names: discovery, the OpenAPI
//! index, or a resource — a collection or one object, in a namespace or
//! not, perhaps a subresource — of a served type.

use std::borrow::Cow;

use atrium_kube::{Catalog, KubeError, ResourceType};

/// A resource path, resolved against the served types.
#[derive(Debug, Clone, PartialEq)]
pub struct At {
    pub resource: Cow<'static, ResourceType>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Version,
    Api,
    Apis,
    Group(String),
    GroupVersion(String, String),
    OpenApi,
    /// `/openapi/v2`, the Swagger 2.0 document.
    OpenApiV2,
    /// `api/v1` or `apis/<group>/<version>`.
    OpenApiDocument(String),
    Resource(At),
}

/// Parses `rest` (the path after `/k8s/{cluster}/`) against the types
/// the cluster serves.
pub fn parse(rest: &str, catalog: &Catalog) -> Result<Target, KubeError> {
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let unknown = || KubeError::no_route(&format!("/{rest}"));
    let (group, version, tail) = match parts.as_slice() {
        ["version"] => return Ok(Target::Version),
        ["api"] => return Ok(Target::Api),
        ["apis"] => return Ok(Target::Apis),
        ["openapi", "v2"] => return Ok(Target::OpenApiV2),
        ["openapi", "v3"] => return Ok(Target::OpenApi),
        ["openapi", "v3", gv @ ..] => return Ok(Target::OpenApiDocument(gv.join("/"))),
        ["apis", g] => return Ok(Target::Group(g.to_string())),
        ["api", v] => return Ok(Target::GroupVersion(String::new(), v.to_string())),
        ["apis", g, v] => return Ok(Target::GroupVersion(g.to_string(), v.to_string())),
        ["api", v, tail @ ..] => ("", *v, tail),
        ["apis", g, v, tail @ ..] => (*g, *v, tail),
        _ => return Err(unknown()),
    };
    let resource = |plural: &str| catalog.find(group, version, plural).ok_or_else(unknown);
    let at =
        |r: Cow<'static, ResourceType>, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| {
            Target::Resource(At {
                resource: r,
                namespace: ns.map(str::to_string),
                name: name.map(str::to_string),
                subresource: sub.map(str::to_string),
            })
        };
    // `namespaces/{ns}/{plural}…` is a namespaced resource when {plural}
    // is one; otherwise `namespaces/{name}/{subresource}`.
    if let ["namespaces", ns, plural, rest @ ..] = tail {
        if let Ok(r) = resource(plural) {
            if !r.namespaced {
                return Err(unknown());
            }
            return match rest {
                [] => Ok(at(r, Some(ns), None, None)),
                [name] => Ok(at(r, Some(ns), Some(name), None)),
                [name, sub] => Ok(at(r, Some(ns), Some(name), Some(sub))),
                _ => Err(unknown()),
            };
        }
    }
    match tail {
        [plural] => Ok(at(resource(plural)?, None, None, None)),
        [plural, name] => {
            let r = resource(plural)?;
            if r.namespaced {
                return Err(unknown());
            }
            Ok(at(r, None, Some(name), None))
        }
        [plural, name, sub] => {
            let r = resource(plural)?;
            if r.namespaced {
                return Err(unknown());
            }
            Ok(at(r, None, Some(name), Some(sub)))
        }
        _ => Err(unknown()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(rest: &str) -> At {
        match parse(rest, &Catalog::default()).unwrap() {
            Target::Resource(at) => at,
            other => panic!("{rest}: {other:?}"),
        }
    }

    #[test]
    fn paths_name_collections_objects_and_subresources() {
        let ns = resource("api/v1/namespaces");
        assert_eq!((ns.resource.plural.as_ref(), ns.name), ("namespaces", None));
        let one = resource("api/v1/namespaces/demo");
        assert_eq!(one.name.as_deref(), Some("demo"));
        let cms = resource("api/v1/namespaces/demo/configmaps");
        assert_eq!(
            (
                cms.resource.plural.as_ref(),
                cms.namespace.as_deref(),
                cms.name
            ),
            ("configmaps", Some("demo"), None)
        );
        let all = resource("api/v1/configmaps");
        assert_eq!(all.namespace, None);
        let cm = resource("api/v1/namespaces/demo/configmaps/cfg");
        assert_eq!(cm.name.as_deref(), Some("cfg"));
        let status = resource("api/v1/namespaces/demo/status");
        assert_eq!(status.subresource.as_deref(), Some("status"));
        for bad in [
            "api/v1/widgets",
            "api/v1/configmaps/cfg",
            "api/v1/namespaces/demo/namespaces",
            "apis/apps/v1/widgets",
            "nope",
            "api/v1/namespaces/demo/configmaps/a/b/c",
        ] {
            assert!(parse(bad, &Catalog::default()).is_err(), "{bad}");
        }
        assert_eq!(
            parse("version", &Catalog::default()).unwrap(),
            Target::Version
        );
    }
}
