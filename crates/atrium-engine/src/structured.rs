//! Structured output: `response_format` `json_object` and `json_schema`,
//! compiled into a grammar of JSON text, and a byte-level matcher that
//! says whether text can still become a document of it. The batcher
//! only lets a sequence take a token whose bytes the matcher accepts, so
//! what it generates always parses and validates (unless `max_tokens` or
//! a stop sequence cuts it short, as OpenAI's does).
//!
//! Keys may come in any order, each at most once; a schema's object has
//! at most 64 properties (a bit each in the matcher's state).
//!
//! The schema is the request's, so compiling it is bounded (nodes,
//! nesting, enum sizes, string lengths) and every keyword that would
//! constrain the value is either enforced or refused by name — never
//! accepted and ignored. Whitespace between tokens is allowed but bounded, so
//! a model cannot loop on blank lines.

mod matcher;

use serde_json::Value;

pub use matcher::Matcher;

use crate::EngineError;

type NodeId = u32;

const MAX_NODES: usize = 1_000;
const MAX_DEPTH: usize = 32;
const MAX_LITERALS: usize = 256;
/// Alternatives one value may open at its first byte (nested `anyOf`s over
/// enums multiply), so no byte of output costs more than this to follow.
const MAX_FAN_OUT: usize = 1024;
/// Properties of one object: each is a bit of the matcher's state.
const MAX_PROPERTIES: usize = 64;

/// A compiled schema.
#[derive(Debug)]
pub struct Grammar {
    nodes: Vec<Node>,
    literals: Vec<Vec<u8>>,
    root: NodeId,
    /// Any JSON value, and any string: a free object's values and keys.
    any_value: NodeId,
    any_string: NodeId,
    /// `true`, `false` and `null`, by literal index.
    words: [u32; 3],
}

#[derive(Debug)]
enum Node {
    /// Keys in order; `required` ones must appear.
    Object(Vec<Prop>),
    /// Any keys, each value `any` (json_object).
    FreeObject,
    Array {
        items: NodeId,
        min: u32,
        max: u32,
    },
    Str {
        min: u32,
        max: u32,
    },
    Integer,
    Number,
    Boolean,
    Null,
    /// Exact JSON texts (`enum`, `const`), by literal index.
    Literals(Vec<u32>),
    AnyOf(Vec<NodeId>),
}

#[derive(Debug)]
struct Prop {
    /// `"key"` as JSON text, by literal index.
    key: u32,
    value: NodeId,
    required: bool,
}

fn refused(at: &str, why: impl std::fmt::Display) -> EngineError {
    EngineError::BadRequest(format!("response_format {at}: {why}"))
}

/// Keywords that describe and do not constrain.
const DESCRIPTIVE: &[&str] = &[
    "title",
    "description",
    "$schema",
    "$id",
    "examples",
    "default",
    "$comment",
];

impl Grammar {
    fn new() -> Grammar {
        let mut g = Grammar {
            nodes: Vec::new(),
            literals: Vec::new(),
            root: 0,
            any_value: 0,
            any_string: 0,
            words: [0; 3],
        };
        g.words = [&b"true"[..], b"false", b"null"].map(|w| g.literal(w.to_vec()));
        g.any_string = g.push(Node::Str {
            min: 0,
            max: u32::MAX,
        });
        g.any_value = g.push(Node::AnyOf(Vec::new()));
        let alternatives = [
            Node::FreeObject,
            Node::Array {
                items: g.any_value,
                min: 0,
                max: u32::MAX,
            },
            Node::Number,
            Node::Boolean,
            Node::Null,
        ];
        let mut ids: Vec<NodeId> = alternatives.into_iter().map(|n| g.push(n)).collect();
        ids.push(g.any_string);
        g.nodes[g.any_value as usize] = Node::AnyOf(ids);
        g
    }

    /// `{"type": "json_object"}`: any JSON object.
    pub fn any_object() -> Grammar {
        let mut g = Grammar::new();
        g.root = g.push(Node::FreeObject);
        g
    }

    /// `json_schema.schema`, compiled; what it cannot enforce is refused.
    pub fn from_schema(schema: &Value) -> Result<Grammar, EngineError> {
        let mut g = Grammar::new();
        g.root = g.compile(schema, "json_schema.schema", 0)?;
        if let Some(most) = (0..g.nodes.len()).map(|n| g.fan_out(n as NodeId)).max() {
            if most > MAX_FAN_OUT {
                return Err(refused(
                    "json_schema.schema",
                    format!(
                        "its anyOf and enum alternatives at one place number {most}; at most \
                         {MAX_FAN_OUT}"
                    ),
                ));
            }
        }
        Ok(g)
    }

    /// The alternatives a value of `node` opens at its first byte: an
    /// enum's values, a boolean's two words, an `anyOf`'s children's, one
    /// for the rest (an object, array or string opens one way).
    fn fan_out(&self, node: NodeId) -> usize {
        match &self.nodes[node as usize] {
            Node::Literals(ids) => ids.len(),
            Node::Boolean => 2,
            Node::AnyOf(ids) => ids
                .iter()
                .map(|id| self.fan_out(*id))
                .fold(0, usize::saturating_add),
            _ => 1,
        }
    }

    /// The grammar of JSON output: of `schema`, or any object without one
    /// (`json_object`, or `json_schema` that gives no schema).
    pub fn for_json(schema: Option<&Value>) -> Result<std::sync::Arc<Grammar>, EngineError> {
        let g = match schema {
            Some(s) => Grammar::from_schema(s)?,
            None => Grammar::any_object(),
        };
        Ok(std::sync::Arc::new(g))
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        (self.nodes.len() - 1) as NodeId
    }

    fn literal(&mut self, text: Vec<u8>) -> u32 {
        self.literals.push(text);
        (self.literals.len() - 1) as u32
    }

    fn compile(&mut self, s: &Value, at: &str, depth: usize) -> Result<NodeId, EngineError> {
        if depth > MAX_DEPTH || self.nodes.len() >= MAX_NODES {
            return Err(refused(at, "the schema is too large or too deep"));
        }
        let Some(map) = s.as_object() else {
            return Err(refused(at, "a schema must be an object"));
        };
        const KNOWN: &[&str] = &[
            "type",
            "properties",
            "required",
            "additionalProperties",
            "items",
            "minItems",
            "maxItems",
            "minLength",
            "maxLength",
            "enum",
            "const",
            "anyOf",
        ];
        if let Some(k) = map
            .keys()
            .find(|k| !KNOWN.contains(&k.as_str()) && !DESCRIPTIVE.contains(&k.as_str()))
        {
            return Err(refused(
                at,
                format!(
                    "keyword {k:?} is not supported; supported are {}",
                    KNOWN.join(", ")
                ),
            ));
        }
        if let Some(values) = map.get("enum") {
            let values = values
                .as_array()
                .filter(|v| !v.is_empty() && v.len() <= MAX_LITERALS)
                .ok_or_else(|| refused(&format!("{at}.enum"), "must list 1 to 256 values"))?;
            let ids = values
                .iter()
                .map(|v| self.literal(v.to_string().into_bytes()))
                .collect();
            return Ok(self.push(Node::Literals(ids)));
        }
        if let Some(value) = map.get("const") {
            let id = self.literal(value.to_string().into_bytes());
            return Ok(self.push(Node::Literals(vec![id])));
        }
        if let Some(all) = map.get("anyOf") {
            let all = all
                .as_array()
                .filter(|a| !a.is_empty() && a.len() <= 16)
                .ok_or_else(|| refused(&format!("{at}.anyOf"), "must list 1 to 16 schemas"))?;
            let mut ids = Vec::new();
            for (i, s) in all.iter().enumerate() {
                ids.push(self.compile(s, &format!("{at}.anyOf[{i}]"), depth + 1)?);
            }
            return Ok(self.push(Node::AnyOf(ids)));
        }
        match map.get("type") {
            Some(Value::Array(types)) if !types.is_empty() && types.len() <= 7 => {
                let mut ids = Vec::new();
                for t in types {
                    let mut one = map.clone();
                    one.insert("type".into(), t.clone());
                    ids.push(self.compile(&Value::Object(one), at, depth + 1)?);
                }
                Ok(self.push(Node::AnyOf(ids)))
            }
            Some(Value::String(t)) => self.typed(t, map, at, depth),
            _ => Err(refused(
                &format!("{at}.type"),
                "is required: a type name or a list of them (or enum, const, anyOf)",
            )),
        }
    }

    fn typed(
        &mut self,
        t: &str,
        map: &serde_json::Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<NodeId, EngineError> {
        let count = |key: &str, default: u32| -> Result<u32, EngineError> {
            match map.get(key) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| *n <= 100_000)
                    .ok_or_else(|| refused(&format!("{at}.{key}"), "must be 0 to 100000")),
            }
        };
        let only = |allowed: &[&str]| -> Result<(), EngineError> {
            let constraining = ["properties", "required", "additionalProperties", "items"]
                .iter()
                .chain(&["minItems", "maxItems", "minLength", "maxLength"]);
            match constraining
                .filter(|k| !allowed.contains(k))
                .find(|k| map.contains_key(**k))
            {
                Some(k) => Err(refused(
                    &format!("{at}.{k}"),
                    format!("does not apply to {t}"),
                )),
                None => Ok(()),
            }
        };
        let node = match t {
            "object" => {
                only(&["properties", "required", "additionalProperties"])?;
                return self.object(map, at, depth);
            }
            "array" => {
                only(&["items", "minItems", "maxItems"])?;
                let items = match map.get("items") {
                    Some(s) => self.compile(s, &format!("{at}.items"), depth + 1)?,
                    None => self.any_value,
                };
                let (min, max) = (count("minItems", 0)?, count("maxItems", u32::MAX)?);
                if min > max {
                    return Err(refused(at, "minItems is more than maxItems"));
                }
                Node::Array { items, min, max }
            }
            "string" => {
                only(&["minLength", "maxLength"])?;
                let (min, max) = (count("minLength", 0)?, count("maxLength", u32::MAX)?);
                if min > max {
                    return Err(refused(at, "minLength is more than maxLength"));
                }
                Node::Str { min, max }
            }
            "integer" => Node::Integer,
            "number" => Node::Number,
            "boolean" => Node::Boolean,
            "null" => Node::Null,
            other => {
                return Err(refused(
                    &format!("{at}.type"),
                    format!("{other:?} is not a JSON type"),
                ))
            }
        };
        if !matches!(t, "array" | "string") {
            only(&[])?;
        }
        Ok(self.push(node))
    }

    fn object(
        &mut self,
        map: &serde_json::Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<NodeId, EngineError> {
        let props = match map.get("properties") {
            None => serde_json::Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => return Err(refused(&format!("{at}.properties"), "must be an object")),
        };
        match map.get("additionalProperties") {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) if props.is_empty() => return Ok(self.push(Node::FreeObject)),
            Some(_) => {
                return Err(refused(
                    &format!("{at}.additionalProperties"),
                    "only false is supported beside properties",
                ))
            }
        }
        if props.is_empty() && !map.contains_key("properties") {
            return Ok(self.push(Node::FreeObject));
        }
        let required: Vec<&str> = match map.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r
                .iter()
                .map(|k| {
                    k.as_str()
                        .filter(|k| props.contains_key(*k))
                        .ok_or_else(|| {
                            refused(&format!("{at}.required"), format!("{k} is not a property"))
                        })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(refused(
                    &format!("{at}.required"),
                    "must be a list of names",
                ))
            }
        };
        if props.len() > MAX_PROPERTIES {
            return Err(refused(
                &format!("{at}.properties"),
                format!("at most {MAX_PROPERTIES} properties per object"),
            ));
        }
        let mut out = Vec::with_capacity(props.len());
        for (name, schema) in &props {
            let value = self.compile(schema, &format!("{at}.properties.{name}"), depth + 1)?;
            let key = self.literal(Value::from(name.as_str()).to_string().into_bytes());
            out.push(Prop {
                key,
                value,
                required: required.contains(&name.as_str()),
            });
        }
        Ok(self.push(Node::Object(out)))
    }

    /// A matcher at the start of a document.
    pub fn start(&self) -> Matcher {
        Matcher::new(self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A hostile tenant nests `anyOf` over large enums so that every byte
    /// fans out into tens of thousands of alternatives (each step of each
    /// token of its replica would pay for them): refused when compiled.
    #[test]
    fn a_schema_whose_alternatives_multiply_is_refused() {
        let wide_enum = |c: char| {
            let values: Vec<Value> = (0..256).map(|i| Value::from(format!("{c}{i}"))).collect();
            json!({"enum": values})
        };
        let inner = |c| json!({"anyOf": (0..16).map(|_| wide_enum(c)).collect::<Vec<_>>()});
        let hostile = json!({"anyOf": (0..16).map(|_| inner('a')).collect::<Vec<_>>()});
        let Err(EngineError::BadRequest(said)) = Grammar::from_schema(&hostile) else {
            panic!("65,536 alternatives at one byte compiled")
        };
        assert!(said.contains("alternatives"), "{said}");
        // Four enums of 256 are as wide as a schema may be.
        let widest = json!({"anyOf": (0..4).map(|_| wide_enum('a')).collect::<Vec<_>>()});
        assert!(Grammar::from_schema(&widest).is_ok());
    }

    #[test]
    fn what_a_schema_asks_that_cannot_be_enforced_is_refused_by_name() {
        let refusal = |schema: Value| match Grammar::from_schema(&schema) {
            Err(EngineError::BadRequest(m)) => m,
            other => panic!("{schema} compiled: {other:?}"),
        };
        assert!(refusal(json!({"type": "string", "pattern": "^a"})).contains("\"pattern\""));
        assert!(refusal(json!({"type": "integer", "minimum": 3})).contains("\"minimum\""));
        assert!(refusal(
            json!({"type": "object", "properties": {"a": {"type": "string"}},
            "required": ["b"]})
        )
        .contains("required"));
        assert!(refusal(json!({"type": "widget"})).contains("widget"));
        assert!(refusal(json!({"properties": {}})).contains("type"));
        assert!(refusal(json!({"type": "string", "maxItems": 2})).contains("maxItems"));
        let mut deep = json!({"type": "string"});
        for _ in 0..40 {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(refusal(deep).contains("too large or too deep"));
        let many: Vec<Value> = (0..300).map(Value::from).collect();
        assert!(refusal(json!({"enum": many})).contains("enum"));
    }
}
