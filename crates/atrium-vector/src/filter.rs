//! Payload filters in Qdrant's shape: `must` (all), `should` (at least one,
//! when given), `must_not` (none), of conditions on a payload key — `match`
//! a value, any of values, or none of them; `range` with `gt`/`gte`/`lt`/
//! `lte` — or a nested filter. Keys may name nested fields with dots
//! (`meta.lang`). A key missing from a payload matches no condition.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Conditions per filter, all clauses and nesting together: a filter costs
/// time at every point it is checked against.
pub const MAX_CONDITIONS: usize = 64;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub must: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub should: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub must_not: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Condition {
    Field(FieldCondition),
    Nested(Box<NestedFilter>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NestedFilter {
    pub filter: Filter,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldCondition {
    pub key: String,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<Match>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<Range>,
}

/// A keyword, integer or boolean to compare with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Keyword(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Match {
    Value { value: Scalar },
    Any { any: Vec<Scalar> },
    Except { except: Vec<Scalar> },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub gt: Option<f64>,
    pub gte: Option<f64>,
    pub lt: Option<f64>,
    pub lte: Option<f64>,
}

impl Scalar {
    /// The scalar a payload value holds, if it is one.
    pub fn of(v: &Value) -> Option<Scalar> {
        match v {
            Value::Bool(b) => Some(Scalar::Bool(*b)),
            Value::Number(n) => n.as_i64().map(Scalar::Int),
            Value::String(s) => Some(Scalar::Keyword(s.clone())),
            _ => None,
        }
    }

    fn matches(&self, v: &Value) -> bool {
        match (self, v) {
            (Scalar::Bool(a), Value::Bool(b)) => a == b,
            (Scalar::Int(a), Value::Number(n)) => n.as_i64() == Some(*a),
            (Scalar::Keyword(a), Value::String(b)) => a == b,
            _ => false,
        }
    }
}

/// The values at a dotted key; an array yields each element, so a
/// condition holds if any element satisfies it (as in Qdrant).
fn values_at<'a>(payload: &'a Map<String, Value>, key: &str) -> Vec<&'a Value> {
    let mut parts = key.split('.');
    let Some(first) = parts.next().and_then(|k| payload.get(k)) else {
        return Vec::new();
    };
    let mut at = first;
    for part in parts {
        match at.get(part) {
            Some(v) => at = v,
            None => return Vec::new(),
        }
    }
    match at {
        Value::Array(items) => items.iter().collect(),
        v => vec![v],
    }
}

impl Filter {
    /// Checks the filter's size and shape; the message says what to fix.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.count();
        if n > MAX_CONDITIONS {
            return Err(format!(
                "the filter has {n} conditions; at most {MAX_CONDITIONS} are allowed"
            ));
        }
        self.each_field(&mut |c| {
            if c.key.is_empty() || c.key.len() > 256 {
                return Err("a condition's `key` must be 1 to 256 bytes".to_string());
            }
            match (&c.matches, &c.range) {
                (Some(_), None) | (None, Some(_)) => Ok(()),
                _ => Err(format!(
                    "the condition on `{}` must have exactly one of `match` and `range`",
                    c.key
                )),
            }
        })
    }

    fn count(&self) -> usize {
        self.must
            .iter()
            .chain(&self.should)
            .chain(&self.must_not)
            .map(|c| match c {
                Condition::Field(_) => 1,
                Condition::Nested(n) => 1 + n.filter.count(),
            })
            .sum()
    }

    fn each_field(
        &self,
        f: &mut dyn FnMut(&FieldCondition) -> Result<(), String>,
    ) -> Result<(), String> {
        for c in self.must.iter().chain(&self.should).chain(&self.must_not) {
            match c {
                Condition::Field(fc) => f(fc)?,
                Condition::Nested(n) => n.filter.each_field(f)?,
            }
        }
        Ok(())
    }

    pub fn accepts(&self, payload: &Map<String, Value>) -> bool {
        self.must.iter().all(|c| c.holds(payload))
            && (self.should.is_empty() || self.should.iter().any(|c| c.holds(payload)))
            && !self.must_not.iter().any(|c| c.holds(payload))
    }

    /// A `must` condition matching one exact scalar, which a keyword index
    /// can answer: (key, value).
    pub fn indexed_term(&self) -> Option<(&str, &Scalar)> {
        self.must.iter().find_map(|c| match c {
            Condition::Field(FieldCondition {
                key,
                matches: Some(Match::Value { value }),
                ..
            }) => Some((key.as_str(), value)),
            _ => None,
        })
    }
}

impl Condition {
    fn holds(&self, payload: &Map<String, Value>) -> bool {
        match self {
            Condition::Nested(n) => n.filter.accepts(payload),
            Condition::Field(c) => {
                let values = values_at(payload, &c.key);
                match (&c.matches, &c.range) {
                    (Some(Match::Value { value }), _) => values.iter().any(|v| value.matches(v)),
                    (Some(Match::Any { any }), _) => {
                        values.iter().any(|v| any.iter().any(|a| a.matches(v)))
                    }
                    (Some(Match::Except { except }), _) => {
                        !values.is_empty()
                            && values.iter().all(|v| !except.iter().any(|a| a.matches(v)))
                    }
                    (None, Some(r)) => values.iter().any(|v| {
                        v.as_f64().is_some_and(|x| {
                            r.gt.is_none_or(|b| x > b)
                                && r.gte.is_none_or(|b| x >= b)
                                && r.lt.is_none_or(|b| x < b)
                                && r.lte.is_none_or(|b| x <= b)
                        })
                    }),
                    (None, None) => false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(v: Value) -> Filter {
        serde_json::from_value(v).unwrap()
    }

    fn payload(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn must_should_and_must_not_combine_as_qdrant_does() {
        let p =
            payload(json!({"lang": "de", "year": 2021, "tags": ["a", "b"], "meta": {"ok": true}}));
        let yes = [
            json!({"must": [{"key": "lang", "match": {"value": "de"}}]}),
            json!({"must": [{"key": "year", "range": {"gte": 2020, "lt": 2022}}]}),
            json!({"should": [{"key": "lang", "match": {"value": "fr"}}, {"key": "tags", "match": {"value": "b"}}]}),
            json!({"must_not": [{"key": "lang", "match": {"any": ["fr", "en"]}}]}),
            json!({"must": [{"key": "meta.ok", "match": {"value": true}}]}),
            json!({"must": [{"filter": {"should": [{"key": "year", "match": {"value": 2021}}]}}]}),
            json!({"must": [{"key": "lang", "match": {"except": ["fr"]}}]}),
        ];
        for f in yes {
            assert!(filter(f.clone()).accepts(&p), "{f}");
        }
        let no = [
            json!({"must": [{"key": "lang", "match": {"value": "fr"}}]}),
            json!({"must": [{"key": "missing", "match": {"value": "de"}}]}),
            json!({"must": [{"key": "year", "range": {"gt": 2021}}]}),
            json!({"should": [{"key": "lang", "match": {"value": "fr"}}]}),
            json!({"must_not": [{"key": "tags", "match": {"value": "a"}}]}),
            json!({"must": [{"key": "missing", "match": {"except": ["x"]}}]}),
        ];
        for f in no {
            assert!(!filter(f.clone()).accepts(&p), "{f}");
        }
    }

    #[test]
    fn malformed_or_oversized_filters_are_refused_with_a_reason() {
        let both =
            filter(json!({"must": [{"key": "a", "match": {"value": 1}, "range": {"lt": 2}}]}));
        assert!(both.validate().unwrap_err().contains("exactly one"));
        let many = Filter {
            must: (0..65)
                .map(|i| {
                    Condition::Field(FieldCondition {
                        key: format!("k{i}"),
                        matches: Some(Match::Value {
                            value: Scalar::Int(i),
                        }),
                        range: None,
                    })
                })
                .collect(),
            ..Filter::default()
        };
        assert!(many.validate().unwrap_err().contains("at most 64"));
        assert!(serde_json::from_value::<Filter>(json!({"must": [], "oops": 1})).is_err());
    }
}
