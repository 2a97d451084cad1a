//! RBAC inside a tenant cluster, for its service accounts: what a request
//! asks (verb, group, resource, subresource, name, namespace) against
//! the cluster's Roles, ClusterRoles and their bindings, as upstream
//! evaluates them — a RoleBinding grants its role's rules in its own
//! namespace only, a ClusterRoleBinding everywhere; nothing is granted
//! unless a rule says so.
//!
//! The tenant's own Atrium keys are the cluster's administrators and are
//! not subject to it. A service account may never write RBAC objects
//! (no `escalate` or `bind`): what it can do is only ever what a tenant
//! administrator granted.

use serde_json::Value;

/// Who asks: a service account of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub namespace: String,
    pub name: String,
}

impl Subject {
    /// `system:serviceaccount:<namespace>:<name>`, as upstream names it.
    pub fn user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }

    fn is(&self, subject: &Value) -> bool {
        let name = subject["name"].as_str().unwrap_or_default();
        match subject["kind"].as_str().unwrap_or_default() {
            "ServiceAccount" => {
                name == self.name && subject["namespace"].as_str() == Some(&self.namespace)
            }
            "User" => name == self.user(),
            "Group" => [
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{}", self.namespace),
                "system:authenticated".to_string(),
            ]
            .iter()
            .any(|g| g == name),
            _ => false,
        }
    }
}

/// What a request asks, in RBAC's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

impl Attributes {
    /// `<verb> <resource>[/<sub>][.<group>] [<name>] [in <namespace>]`.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {}", self.verb, self.resource);
        if let Some(sub) = &self.subresource {
            s.push('/');
            s.push_str(sub);
        }
        if !self.group.is_empty() {
            s.push('.');
            s.push_str(&self.group);
        }
        if let Some(n) = &self.name {
            s.push_str(&format!(" {n:?}"));
        }
        match &self.namespace {
            Some(ns) => s.push_str(&format!(" in the namespace {ns:?}")),
            None => s.push_str(" at the cluster scope"),
        }
        s
    }
}

/// The RBAC verb of a request: `watch` and `list` for collections, `get`
/// for one object, and the writes by method.
pub fn verb(method: &str, named: bool, watching: bool) -> &'static str {
    match (method, named) {
        ("GET" | "HEAD", _) if watching => "watch",
        ("GET" | "HEAD", true) => "get",
        ("GET" | "HEAD", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Whether one rule allows `a`.
fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let any_of = |list: Vec<&str>, want: &str| list.iter().any(|x| *x == "*" || *x == want);
    let resource = match &a.subresource {
        Some(sub) => format!("{}/{sub}", a.resource),
        None => a.resource.clone(),
    };
    let resources = strings(&rule["resources"]);
    let resource_ok = resources.iter().any(|r| {
        *r == "*"
            || *r == resource
            || a.subresource
                .as_ref()
                .is_some_and(|sub| *r == format!("*/{sub}"))
    });
    let names = strings(&rule["resourceNames"]);
    let name_ok = names.is_empty() || a.name.as_deref().is_some_and(|n| names.contains(&n));
    any_of(strings(&rule["verbs"]), &a.verb)
        && any_of(strings(&rule["apiGroups"]), &a.group)
        && resource_ok
        && name_ok
}

/// The cluster's RBAC objects, as stored.
#[derive(Debug, Default)]
pub struct Policy<'a> {
    pub roles: Vec<&'a Value>,
    pub cluster_roles: Vec<&'a Value>,
    pub role_bindings: Vec<&'a Value>,
    pub cluster_role_bindings: Vec<&'a Value>,
}

impl Policy<'_> {
    fn role(&self, role_ref: &Value, namespace: Option<&str>) -> Option<&Value> {
        let name = role_ref["name"].as_str()?;
        let named = |r: &&&Value| r["metadata"]["name"].as_str() == Some(name);
        match role_ref["kind"].as_str()? {
            "ClusterRole" => self.cluster_roles.iter().find(named).copied(),
            "Role" => self
                .roles
                .iter()
                .filter(|r| r["metadata"]["namespace"].as_str() == namespace)
                .find(named)
                .copied(),
            _ => None,
        }
    }

    fn grants(&self, role: Option<&Value>, a: &Attributes) -> bool {
        role.and_then(|r| r["rules"].as_array())
            .is_some_and(|rules| rules.iter().any(|rule| rule_allows(rule, a)))
    }

    /// Whether `who` may do `a`.
    pub fn allows(&self, who: &Subject, a: &Attributes) -> bool {
        let bound = |b: &&&Value| {
            b["subjects"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| who.is(s)))
        };
        let everywhere = self
            .cluster_role_bindings
            .iter()
            .filter(bound)
            .filter(|b| b["roleRef"]["kind"] == "ClusterRole")
            .any(|b| self.grants(self.role(&b["roleRef"], None), a));
        if everywhere {
            return true;
        }
        let Some(ns) = a.namespace.as_deref() else {
            return false;
        };
        self.role_bindings
            .iter()
            .filter(|b| b["metadata"]["namespace"].as_str() == Some(ns))
            .filter(bound)
            .any(|b| self.grants(self.role(&b["roleRef"], Some(ns)), a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ask(verb: &str, resource: &str, ns: Option<&str>) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: String::new(),
            resource: resource.into(),
            subresource: None,
            name: Some("cfg".into()),
            namespace: ns.map(str::to_string),
        }
    }

    #[test]
    fn a_role_binding_grants_its_rules_in_its_namespace_only() {
        let role = json!({"metadata": {"name": "reader", "namespace": "demo"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]});
        let binding = json!({"metadata": {"name": "b", "namespace": "demo"},
            "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": "demo"}],
            "roleRef": {"kind": "Role", "name": "reader", "apiGroup": "rbac.authorization.k8s.io"}});
        let policy = Policy {
            roles: vec![&role],
            role_bindings: vec![&binding],
            ..Policy::default()
        };
        let bot = Subject {
            namespace: "demo".into(),
            name: "bot".into(),
        };
        assert!(policy.allows(&bot, &ask("get", "configmaps", Some("demo"))));
        assert!(policy.allows(&bot, &ask("list", "configmaps", Some("demo"))));
        assert!(!policy.allows(&bot, &ask("delete", "configmaps", Some("demo"))));
        assert!(!policy.allows(&bot, &ask("get", "secrets", Some("demo"))));
        assert!(!policy.allows(&bot, &ask("get", "configmaps", Some("other"))));
        assert!(!policy.allows(&bot, &ask("list", "configmaps", None)));
        let twin = Subject {
            namespace: "other".into(),
            name: "bot".into(),
        };
        assert!(!policy.allows(&twin, &ask("get", "configmaps", Some("demo"))));
    }

    #[test]
    fn cluster_roles_bound_cluster_wide_reach_every_namespace_and_name_limits_hold() {
        let role = json!({"metadata": {"name": "pods"},
            "rules": [{"apiGroups": ["", "apps"], "resources": ["pods", "pods/log", "deployments"],
                       "verbs": ["*"]},
                      {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                       "resourceNames": ["cfg"]}]});
        let binding = json!({"metadata": {"name": "b"},
            "subjects": [{"kind": "Group", "name": "system:serviceaccounts:ops"}],
            "roleRef": {"kind": "ClusterRole", "name": "pods"}});
        let policy = Policy {
            cluster_roles: vec![&role],
            cluster_role_bindings: vec![&binding],
            ..Policy::default()
        };
        let ops = Subject {
            namespace: "ops".into(),
            name: "any".into(),
        };
        assert!(policy.allows(&ops, &ask("delete", "pods", Some("web"))));
        let mut log = ask("get", "pods", Some("web"));
        log.subresource = Some("log".into());
        assert!(policy.allows(&ops, &log));
        let mut exec = log.clone();
        exec.subresource = Some("exec".into());
        assert!(!policy.allows(&ops, &exec), "pods/exec is not pods/log");
        assert!(policy.allows(&ops, &ask("get", "secrets", Some("web"))));
        let mut other = ask("get", "secrets", Some("web"));
        other.name = Some("db".into());
        assert!(!policy.allows(&ops, &other));
        let outsider = Subject {
            namespace: "dev".into(),
            name: "any".into(),
        };
        assert!(!policy.allows(&outsider, &ask("get", "pods", Some("web"))));
        assert_eq!(verb("GET", false, true), "watch");
        assert_eq!(verb("GET", true, false), "get");
        assert_eq!(verb("DELETE", false, false), "deletecollection");
    }
}
