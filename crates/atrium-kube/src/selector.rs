//! Label selectors (`app=web,tier!=db,env in (a,b),!legacy`) and field
//! selectors (`metadata.name=x`), as list and watch requests carry them.

use serde_json::Value;

use crate::status::KubeError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits on commas outside parentheses.
fn terms(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn bad(s: &str) -> KubeError {
    KubeError::bad_request(format!("unable to parse requirement: {s:?}"))
}

fn set(values: &str, term: &str) -> Result<Vec<String>, KubeError> {
    let inner = values
        .trim()
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| bad(term))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<LabelSelector, KubeError> {
        let mut reqs = Vec::new();
        for term in terms(s)
            .into_iter()
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let req = if let Some(key) = term.strip_prefix('!') {
                Requirement::Absent(key.trim().to_string())
            } else if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotIn(k.trim().into(), vec![v.trim().into()])
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement::In(k.trim().into(), vec![v.trim().into()])
            } else if let Some((k, v)) = term.split_once(" notin ") {
                Requirement::NotIn(k.trim().into(), set(v, term)?)
            } else if let Some((k, v)) = term.split_once(" in ") {
                Requirement::In(k.trim().into(), set(v, term)?)
            } else {
                Requirement::Exists(term.to_string())
            };
            let key = match &req {
                Requirement::Exists(k)
                | Requirement::Absent(k)
                | Requirement::In(k, _)
                | Requirement::NotIn(k, _) => k,
            };
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(bad(term));
            }
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// `key=value` for each entry (a service's `selector`).
    pub fn equal(labels: &std::collections::BTreeMap<String, String>) -> LabelSelector {
        LabelSelector(
            labels
                .iter()
                .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
                .collect(),
        )
    }

    /// Whether `obj`'s labels satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let label = |k: &str| {
            obj.pointer("/metadata/labels")
                .and_then(|l| l.get(k))
                .and_then(Value::as_str)
        };
        self.0.iter().all(|r| match r {
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::Absent(k) => label(k).is_none(),
            Requirement::In(k, vs) => label(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|v| vs.iter().all(|x| x != v)),
        })
    }
}

/// A parsed field selector over the fields every object has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// The fields a selector may name: every object's name and namespace,
/// and what upstream indexes of events and pods.
const FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "type",
    "status.phase",
    "spec.nodeName",
    "spec.restartPolicy",
];

impl FieldSelector {
    pub fn parse(s: &str) -> Result<FieldSelector, KubeError> {
        let mut reqs = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(bad(term));
            };
            if !FIELDS.contains(&field.trim()) {
                return Err(KubeError::bad_request(format!(
                    "field label not supported: {}",
                    field.trim()
                )));
            }
            reqs.push((field.trim().to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let pointer = format!("/{}", field.replace('.', "/"));
            let got = obj.pointer(&pointer).and_then(Value::as_str).unwrap_or("");
            (got == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_match_as_kubernetes_does() {
        let obj = json!({"metadata": {"name": "a", "labels": {"app": "web", "env": "prod"}}});
        let yes = [
            "app=web",
            "app==web",
            "env in (prod, dev)",
            "tier notin (db)",
            "app",
            "!tier",
            "app=web,env!=dev",
            "",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&obj), "{s}");
        }
        for s in [
            "app=db",
            "env notin (prod)",
            "!app",
            "tier",
            "app in (db,cache)",
        ] {
            assert!(!LabelSelector::parse(s).unwrap().matches(&obj), "{s}");
        }
        assert!(LabelSelector::parse("env in prod").is_err());
    }

    #[test]
    fn field_selectors_know_their_fields() {
        let obj = json!({"metadata": {"name": "a", "namespace": "demo"}});
        assert!(FieldSelector::parse("metadata.name=a")
            .unwrap()
            .matches(&obj));
        assert!(!FieldSelector::parse("metadata.namespace!=demo")
            .unwrap()
            .matches(&obj));
        assert!(FieldSelector::parse("spec.containers=x").is_err());
    }
}
