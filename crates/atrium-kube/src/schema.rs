//! Custom resources' schemas: the structural subset of OpenAPI v3 that a
//! definition's `openAPIV3Schema` is written in, as upstream requires it,
//! checked when the definition is written (`check`); and every custom
//! object checked against its version's schema when it is written
//! (`admit`): unknown fields pruned — or refused, under
//! `fieldValidation=Strict` —, defaults filled in, values validated.
//!
//! A definition is a tenant's, and so is every object: the schema is
//! bounded (depth, nodes, patterns and their size) before anything walks or compiles
//! it, and patterns run on `regex`, linear in the text, never
//! backtracking. What is deliberately absent: CEL rules
//! (`x-kubernetes-validations`) are refused, not ignored, since a rule the
//! server accepted and then did not enforce would be a silent hole; and
//! defaults are applied on write, not again on read.

use serde_json::{Map, Value};

/// Deepest a schema may nest (upstream's JSON limit bounds objects too).
const MAX_DEPTH: usize = 48;
/// Most schema nodes one version's schema may hold.
const MAX_NODES: usize = 4096;
/// Longest pattern, and the most memory one may compile to.
const MAX_PATTERN: usize = 1024;
const PATTERN_MEMORY: usize = 1 << 20;
/// Most patterns one schema may hold: each is compiled at each write of
/// an object, so their number bounds what one write costs.
const MAX_PATTERNS: usize = 64;

const TYPES: &[&str] = &["object", "array", "string", "integer", "number", "boolean"];

/// Keys a schema node may carry; anything else is refused by name.
const KEYS: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "default",
    "nullable",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "maximum",
    "minimum",
    "exclusiveMaximum",
    "exclusiveMinimum",
    "multipleOf",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "uniqueItems",
    "maxProperties",
    "minProperties",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "example",
    "externalDocs",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
];

/// What a value validation (inside `allOf`, `anyOf`, `oneOf`, `not`) may
/// not say: the structure is the schema's own, as upstream requires.
const STRUCTURAL_ONLY: &[&str] = &[
    "type",
    "default",
    "nullable",
    "additionalProperties",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string",
];

fn flag(schema: &Map<String, Value>, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn field(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Compiles a schema's pattern within the bounds.
fn pattern(p: &str) -> Result<regex::Regex, String> {
    if p.len() > MAX_PATTERN {
        return Err(format!("is longer than {MAX_PATTERN} characters"));
    }
    regex::RegexBuilder::new(p)
        .size_limit(PATTERN_MEMORY)
        .dfa_size_limit(PATTERN_MEMORY)
        .build()
        .map_err(|e| format!("is not a valid pattern: {e}"))
}

struct Checker {
    nodes: usize,
    patterns: usize,
    errors: Vec<String>,
}

/// Refuses a schema that is not structural, or says what this server
/// cannot enforce. Each error names the schema path it is at.
pub fn check(schema: &Value) -> Result<(), Vec<String>> {
    let mut c = Checker {
        nodes: 0,
        patterns: 0,
        errors: Vec::new(),
    };
    c.node(schema, "openAPIV3Schema", 0, false);
    if c.errors.is_empty() {
        match schema.get("type").and_then(Value::as_str) {
            Some("object") => {}
            _ => c
                .errors
                .push("openAPIV3Schema.type: Required value: must be object".into()),
        }
        if let Some(meta) = schema.pointer("/properties/metadata") {
            c.metadata(meta);
        }
    }
    if c.errors.is_empty() {
        c.defaults(schema, "openAPIV3Schema");
    }
    if c.errors.is_empty() {
        Ok(())
    } else {
        Err(c.errors)
    }
}

impl Checker {
    fn fail(&mut self, path: &str, why: impl std::fmt::Display) {
        if self.errors.len() < 16 {
            self.errors.push(format!("{path}: {why}"));
        }
    }

    fn node(&mut self, schema: &Value, path: &str, depth: usize, junctor: bool) {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            if self.nodes == MAX_NODES + 1 {
                self.fail(path, format!("the schema has more than {MAX_NODES} nodes"));
            }
            return;
        }
        if depth > MAX_DEPTH {
            return self.fail(path, format!("the schema nests deeper than {MAX_DEPTH}"));
        }
        let Some(s) = schema.as_object() else {
            return self.fail(path, "must be a schema object");
        };
        for key in s.keys() {
            if key == "x-kubernetes-validations" {
                self.fail(
                    &field(path, key),
                    "Forbidden: CEL validation rules are not supported by this server; \
                     remove them and enforce the rule in your controller",
                );
            } else if key == "$ref" {
                self.fail(&field(path, key), "Forbidden: $ref is not allowed");
            } else if !KEYS.contains(&key.as_str()) {
                self.fail(&field(path, key), "Forbidden: not a supported schema field");
            } else if junctor && STRUCTURAL_ONLY.contains(&key.as_str()) {
                self.fail(
                    &field(path, key),
                    "Forbidden: must not be used inside allOf, anyOf, oneOf or not",
                );
            }
        }
        let int_or_string = flag(s, "x-kubernetes-int-or-string");
        let preserve = flag(s, "x-kubernetes-preserve-unknown-fields");
        match s.get("type") {
            Some(Value::String(t)) if TYPES.contains(&t.as_str()) => {
                if t == "array" && s.get("items").is_none() && !junctor {
                    self.fail(&field(path, "items"), "Required value: must be specified");
                }
            }
            Some(other) => self.fail(
                &field(path, "type"),
                format!(
                    "Unsupported value: {other}: supported values: {}",
                    TYPES.join(", ")
                ),
            ),
            None if junctor || int_or_string || preserve => {}
            None => self.fail(
                &field(path, "type"),
                "Required value: must not be empty for specified object fields",
            ),
        }
        if s.contains_key("properties") && s.contains_key("additionalProperties") {
            self.fail(
                &field(path, "additionalProperties"),
                "Forbidden: additionalProperties and properties are mutual exclusive",
            );
        }
        if let Some(props) = s.get("properties") {
            match props.as_object() {
                Some(props) => {
                    for (k, v) in props {
                        self.node(v, &format!("{path}.properties[{k}]"), depth + 1, junctor);
                    }
                }
                None => self.fail(&field(path, "properties"), "must be an object"),
            }
        }
        match s.get("additionalProperties") {
            None | Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => self.fail(
                &field(path, "additionalProperties"),
                "Forbidden: must not be false; unknown fields are pruned",
            ),
            Some(v) => self.node(v, &field(path, "additionalProperties"), depth + 1, junctor),
        }
        if let Some(items) = s.get("items") {
            self.node(items, &field(path, "items"), depth + 1, junctor);
        }
        for key in ["allOf", "anyOf", "oneOf"] {
            if let Some(list) = s.get(key) {
                match list.as_array() {
                    Some(list) => {
                        for (i, v) in list.iter().enumerate() {
                            self.node(v, &format!("{path}.{key}[{i}]"), depth + 1, true);
                        }
                    }
                    None => self.fail(&field(path, key), "must be a list of schemas"),
                }
            }
        }
        if let Some(not) = s.get("not") {
            self.node(not, &field(path, "not"), depth + 1, true);
        }
        self.bounds(s, path);
    }

    fn bounds(&mut self, s: &Map<String, Value>, path: &str) {
        for key in ["maximum", "minimum", "multipleOf"] {
            if s.get(key).is_some_and(|v| !v.is_number()) {
                self.fail(&field(path, key), "must be a number");
            }
        }
        if s.get("multipleOf")
            .and_then(Value::as_f64)
            .is_some_and(|m| m <= 0.0)
        {
            self.fail(&field(path, "multipleOf"), "must be greater than 0");
        }
        for key in [
            "maxLength",
            "minLength",
            "maxItems",
            "minItems",
            "maxProperties",
            "minProperties",
        ] {
            if s.get(key).is_some_and(|v| v.as_u64().is_none()) {
                self.fail(&field(path, key), "must be a whole number of at least 0");
            }
        }
        for key in [
            "exclusiveMaximum",
            "exclusiveMinimum",
            "uniqueItems",
            "nullable",
        ] {
            if s.get(key).is_some_and(|v| !v.is_boolean()) {
                self.fail(&field(path, key), "must be true or false");
            }
        }
        if let Some(p) = s.get("pattern") {
            self.patterns += 1;
            if self.patterns == MAX_PATTERNS + 1 {
                self.fail(
                    &field(path, "pattern"),
                    format!("Too many: a schema holds at most {MAX_PATTERNS} patterns"),
                );
            }
            match p.as_str().map(pattern) {
                Some(Ok(_)) => {}
                Some(Err(why)) => self.fail(&field(path, "pattern"), why),
                None => self.fail(&field(path, "pattern"), "must be a string"),
            }
        }
        if s.get("enum").is_some_and(|e| !e.is_array()) {
            self.fail(&field(path, "enum"), "must be a list");
        }
        let names = |v: &Value| v.as_array().is_some_and(|a| a.iter().all(Value::is_string));
        for key in ["required", "x-kubernetes-list-map-keys"] {
            if s.get(key).is_some_and(|v| !names(v)) {
                self.fail(&field(path, key), "must be a list of field names");
            }
        }
        if let Some(t) = s.get("x-kubernetes-list-type") {
            if !matches!(t.as_str(), Some("atomic" | "set" | "map")) {
                self.fail(
                    &field(path, "x-kubernetes-list-type"),
                    "Unsupported value: supported values: atomic, set, map",
                );
            }
        }
    }

    /// The root's `metadata` may only restrict `name` and `generateName`.
    fn metadata(&mut self, meta: &Value) {
        let path = "openAPIV3Schema.properties[metadata]";
        let Some(m) = meta.as_object() else { return };
        for key in m.keys() {
            if !["type", "description", "properties"].contains(&key.as_str()) {
                self.fail(&field(path, key), "Forbidden: must not be specified");
            }
        }
        if let Some(props) = m.get("properties").and_then(Value::as_object) {
            for key in props.keys() {
                if !["name", "generateName"].contains(&key.as_str()) {
                    self.fail(
                        &format!("{path}.properties[{key}]"),
                        "Forbidden: only name and generateName may be restricted",
                    );
                }
            }
        }
    }

    /// Each default must itself be valid where it stands.
    fn defaults(&mut self, schema: &Value, path: &str) {
        let Some(s) = schema.as_object() else { return };
        if let Some(default) = s.get("default") {
            let mut value = default.clone();
            let mut out = Outcome::default();
            walk(
                schema,
                &mut value,
                &field(path, "default"),
                Mode::Prune,
                &mut out,
            );
            if let Some(e) = out.errors.into_iter().next() {
                self.fail(&field(path, "default"), format!("Invalid value: {e}"));
            } else if !out.unknown.is_empty() {
                self.fail(
                    &field(path, "default"),
                    "Invalid value: must not have unknown fields (they would be pruned)",
                );
            }
        }
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                self.defaults(v, &format!("{path}.properties[{k}]"));
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(v) = s.get(key).filter(|v| v.is_object()) {
                self.defaults(v, &field(path, key));
            }
        }
    }
}

/// How unknown fields are handled: pruned, or also reported.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Prune,
    /// Inside `allOf`/`anyOf`/`oneOf`/`not`: validate, change nothing.
    Validate,
}

/// What checking one object found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// `spec.size: Invalid value: …`, as upstream words them.
    pub errors: Vec<String>,
    /// Paths of the fields pruned because the schema does not know them.
    pub unknown: Vec<String>,
}

/// Prunes, defaults and validates `obj` (a whole custom object) against
/// its version's schema. Its `apiVersion`, `kind` and `metadata` are the
/// server's to check, except the `name` and `generateName` a schema may
/// restrict.
pub fn admit(schema: &Value, obj: &mut Value) -> Outcome {
    let mut out = Outcome::default();
    let Some(root) = obj.as_object_mut() else {
        out.errors.push("the object is not a JSON object".into());
        return out;
    };
    let props = schema.get("properties").and_then(Value::as_object);
    let preserve = schema
        .as_object()
        .is_some_and(|s| flag(s, "x-kubernetes-preserve-unknown-fields"));
    let kept = ["apiVersion", "kind", "metadata"];
    let unknown: Vec<String> = root
        .keys()
        .filter(|k| !kept.contains(&k.as_str()))
        .filter(|k| !preserve && props.is_none_or(|p| !p.contains_key(k.as_str())))
        .cloned()
        .collect();
    for k in unknown {
        root.remove(&k);
        out.unknown.push(k);
    }
    if let Some(meta) = schema.pointer("/properties/metadata/properties") {
        for key in ["name", "generateName"] {
            if let (Some(s), Some(v)) = (
                meta.get(key),
                root.get_mut("metadata").and_then(|m| m.get_mut(key)),
            ) {
                walk(s, v, &format!("metadata.{key}"), Mode::Prune, &mut out);
            }
        }
    }
    let Some(props) = props else {
        return out;
    };
    for (key, s) in props.iter().filter(|(k, _)| !kept.contains(&k.as_str())) {
        property(s, root, key, "", Mode::Prune, &mut out);
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for r in required.iter().filter_map(Value::as_str) {
            if !root.contains_key(r) {
                out.errors.push(format!("{r}: Required value"));
            }
        }
    }
    out
}

/// One property of an object: a null that may not be null is dropped, an
/// absent one with a default gets it, and what is there is walked.
fn property(
    s: &Value,
    obj: &mut Map<String, Value>,
    key: &str,
    path: &str,
    mode: Mode,
    out: &mut Outcome,
) {
    let nullable = s.as_object().is_some_and(|s| flag(s, "nullable"));
    if mode == Mode::Prune {
        if obj.get(key).is_some_and(Value::is_null) && !nullable {
            obj.remove(key);
        }
        if let (false, Some(d)) = (obj.contains_key(key), s.get("default")) {
            obj.insert(key.to_string(), d.clone());
        }
    }
    if let Some(v) = obj.get_mut(key) {
        walk(s, v, &field(path, key), mode, out);
    }
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn shown(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(64) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// Checks `v` at `path` against `schema`, pruning and defaulting below it
/// unless only validating.
fn walk(schema: &Value, v: &mut Value, path: &str, mode: Mode, out: &mut Outcome) {
    let Some(s) = schema.as_object() else { return };
    let invalid = |why: String| format!("{path}: Invalid value: {}: {why}", shown(v));
    if v.is_null() {
        if !flag(s, "nullable") && s.contains_key("type") {
            out.errors.push(invalid(format!(
                "{path} in body must be of type {}",
                s["type"].as_str().unwrap_or("object")
            )));
        }
        return;
    }
    let actual = type_of(v);
    let fits = match s.get("type").and_then(Value::as_str) {
        None => !flag(s, "x-kubernetes-int-or-string") || matches!(actual, "integer" | "string"),
        Some("number") => matches!(actual, "integer" | "number"),
        Some(t) => t == actual,
    };
    if !fits {
        let want = s
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("integer or string");
        out.errors.push(invalid(format!(
            "{path} in body must be of type {want}: {actual:?}"
        )));
        return;
    }
    if let Some(options) = s.get("enum").and_then(Value::as_array) {
        if !options.contains(v) {
            let list: Vec<String> = options.iter().map(shown).collect();
            out.errors.push(format!(
                "{path}: Unsupported value: {}: supported values: {}",
                shown(v),
                list.join(", ")
            ));
        }
    }
    match v {
        Value::Object(map) => object(s, map, path, mode, out),
        Value::Array(items) => array(s, items, path, mode, out),
        Value::String(text) => string(s, text, path, out),
        Value::Number(_) => number(s, v, path, out),
        _ => {}
    }
    junctors(s, v, path, out);
}

fn object(
    s: &Map<String, Value>,
    map: &mut Map<String, Value>,
    path: &str,
    mode: Mode,
    out: &mut Outcome,
) {
    let props = s.get("properties").and_then(Value::as_object);
    let additional = s.get("additionalProperties").filter(|a| a.is_object());
    let keeps_unknown = flag(s, "x-kubernetes-preserve-unknown-fields")
        || s.get("additionalProperties") == Some(&Value::Bool(true));
    let embedded = flag(s, "x-kubernetes-embedded-resource");
    if mode == Mode::Prune && !keeps_unknown && additional.is_none() {
        let unknown: Vec<String> = map
            .keys()
            .filter(|k| props.is_none_or(|p| !p.contains_key(k.as_str())))
            .filter(|k| !(embedded && ["apiVersion", "kind", "metadata"].contains(&k.as_str())))
            .cloned()
            .collect();
        for k in unknown {
            map.remove(&k);
            out.unknown.push(field(path, &k));
        }
    }
    if let Some(props) = props {
        for (key, ps) in props {
            property(ps, map, key, path, mode, out);
        }
    }
    if let Some(a) = additional {
        for (key, v) in map.iter_mut() {
            walk(a, v, &format!("{path}[{key}]"), mode, out);
        }
    }
    if let Some(required) = s.get("required").and_then(Value::as_array) {
        for r in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                out.errors
                    .push(format!("{}: Required value", field(path, r)));
            }
        }
    }
    counted(
        s,
        map.len(),
        ("maxProperties", "minProperties", "properties"),
        path,
        out,
    );
}

/// A count's bounds (`maxItems`/`minItems`, `maxProperties`/
/// `minProperties`).
fn counted(
    s: &Map<String, Value>,
    n: usize,
    (max, min, what): (&str, &str, &str),
    path: &str,
    out: &mut Outcome,
) {
    let n = n as u64;
    if let Some(m) = s.get(max).and_then(Value::as_u64).filter(|m| n > *m) {
        out.errors.push(format!(
            "{path}: Too many: {n}: must have at most {m} {what}"
        ));
    }
    if let Some(m) = s.get(min).and_then(Value::as_u64).filter(|m| n < *m) {
        out.errors.push(format!(
            "{path}: Invalid value: {n}: must have at least {m} {what}"
        ));
    }
}

fn array(s: &Map<String, Value>, items: &mut [Value], path: &str, mode: Mode, out: &mut Outcome) {
    if let Some(item) = s.get("items") {
        for (i, v) in items.iter_mut().enumerate() {
            walk(item, v, &format!("{path}[{i}]"), mode, out);
        }
    }
    counted(s, items.len(), ("maxItems", "minItems", "items"), path, out);
    let list_type = s.get("x-kubernetes-list-type").and_then(Value::as_str);
    let key_of = |v: &Value| -> Value {
        match (
            list_type,
            s.get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array),
        ) {
            (Some("map"), Some(keys)) => Value::Array(
                keys.iter()
                    .map(|k| {
                        k.as_str()
                            .and_then(|k| v.get(k))
                            .cloned()
                            .unwrap_or(Value::Null)
                    })
                    .collect(),
            ),
            _ => v.clone(),
        }
    };
    if flag(s, "uniqueItems") || matches!(list_type, Some("set" | "map")) {
        for (i, v) in items.iter().enumerate() {
            let k = key_of(v);
            if items[..i].iter().any(|earlier| key_of(earlier) == k) {
                out.errors
                    .push(format!("{path}[{i}]: Duplicate value: {}", shown(&k)));
            }
        }
    }
}

fn string(s: &Map<String, Value>, text: &str, path: &str, out: &mut Outcome) {
    let n = text.chars().count() as u64;
    if s.get("maxLength")
        .and_then(Value::as_u64)
        .is_some_and(|m| n > m)
    {
        out.errors.push(format!(
            "{path}: Too long: may not be more than {} bytes",
            s["maxLength"]
        ));
    }
    if s.get("minLength")
        .and_then(Value::as_u64)
        .is_some_and(|m| n < m)
    {
        out.errors.push(format!(
            "{path}: Invalid value: {}: {path} in body should be at least {} chars long",
            shown(&Value::String(text.into())),
            s["minLength"]
        ));
    }
    if let Some(p) = s.get("pattern").and_then(Value::as_str) {
        // The pattern compiled when its definition was written.
        if pattern(p).is_ok_and(|re| !re.is_match(text)) {
            out.errors.push(format!(
                "{path}: Invalid value: {}: {path} in body should match '{p}'",
                shown(&Value::String(text.into()))
            ));
        }
    }
    // Of upstream's formats, the one controllers read back as a time.
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    let date_time = s.get("format").and_then(Value::as_str) == Some("date-time");
    if date_time && time::OffsetDateTime::parse(text, rfc3339).is_err() {
        out.errors.push(format!(
            "{path}: Invalid value: {text:?}: {path} in body must be of type {}",
            s["format"].as_str().unwrap_or_default()
        ));
    }
}

fn number(s: &Map<String, Value>, v: &Value, path: &str, out: &mut Outcome) {
    let Some(x) = v.as_f64() else { return };
    let bound = |key: &str| s.get(key).and_then(Value::as_f64);
    if let Some(max) = bound("maximum") {
        let exclusive = flag(s, "exclusiveMaximum");
        if x > max || (exclusive && x == max) {
            let rel = if exclusive {
                "less than"
            } else {
                "less than or equal to"
            };
            out.errors.push(format!(
                "{path}: Invalid value: {v}: {path} in body should be {rel} {}",
                s["maximum"]
            ));
        }
    }
    if let Some(min) = bound("minimum") {
        let exclusive = flag(s, "exclusiveMinimum");
        if x < min || (exclusive && x == min) {
            let rel = if exclusive {
                "greater than"
            } else {
                "greater than or equal to"
            };
            out.errors.push(format!(
                "{path}: Invalid value: {v}: {path} in body should be {rel} {}",
                s["minimum"]
            ));
        }
    }
    if let Some(m) = bound("multipleOf").filter(|m| *m > 0.0) {
        let q = x / m;
        if (q - q.round()).abs() > 1e-9 {
            out.errors.push(format!(
                "{path}: Invalid value: {v}: {path} in body should be a multiple of {}",
                s["multipleOf"]
            ));
        }
    }
    let int32 = s.get("format").and_then(Value::as_str) == Some("int32");
    if int32 && v.as_i64().is_none_or(|i| i32::try_from(i).is_err()) {
        out.errors.push(format!(
            "{path}: Invalid value: {v}: {path} in body must be of type int32"
        ));
    }
}

/// `allOf`, `anyOf`, `oneOf` and `not`: validations only.
fn junctors(s: &Map<String, Value>, v: &Value, path: &str, out: &mut Outcome) {
    let passes = |schema: &Value| {
        let mut copy = v.clone();
        let mut o = Outcome::default();
        walk(schema, &mut copy, path, Mode::Validate, &mut o);
        o.errors
    };
    let list = |key: &str| {
        s.get(key)
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    };
    for sub in list("allOf") {
        out.errors.extend(passes(sub));
    }
    let any = list("anyOf");
    if !any.is_empty() && any.iter().all(|sub| !passes(sub).is_empty()) {
        out.errors.push(format!(
            "{path}: Invalid value: {}: {path} in body must match at least one schema in anyOf",
            shown(v)
        ));
    }
    let one = list("oneOf");
    if !one.is_empty() {
        let matching = one.iter().filter(|sub| passes(sub).is_empty()).count();
        if matching != 1 {
            out.errors.push(format!(
                "{path}: Invalid value: {}: {path} in body must match exactly one schema in oneOf",
                shown(v)
            ));
        }
    }
    if let Some(not) = s.get("not") {
        if passes(not).is_empty() {
            out.errors.push(format!(
                "{path}: Invalid value: {}: {path} in body must not match the schema in not",
                shown(v)
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn widget_schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["size"], "properties": {
                "size": {"type": "integer", "minimum": 1, "maximum": 10},
                "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 8},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "port": {"x-kubernetes-int-or-string": true},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "items": {"type": "array", "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["name"],
                    "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
            }},
            "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        }})
    }

    #[test]
    fn an_object_is_pruned_defaulted_and_validated() {
        let schema = widget_schema();
        check(&schema).unwrap();
        let mut obj = json!({"apiVersion": "example.com/v1", "kind": "Widget",
            "metadata": {"name": "w"}, "junk": 1,
            "spec": {"size": 3, "bogus": true, "extra": {"any": {"thing": 1}},
                     "port": "http", "labels": {"a": "b"}}});
        let out = admit(&schema, &mut obj);
        assert_eq!(out.errors, Vec::<String>::new());
        assert_eq!(out.unknown, ["junk", "spec.bogus"]);
        assert_eq!(obj["spec"]["color"], "red");
        assert_eq!(obj["spec"]["extra"]["any"]["thing"], 1);
        assert!(obj.get("junk").is_none() && obj["spec"].get("bogus").is_none());
        assert_eq!(obj["metadata"]["name"], "w");

        let mut bad = json!({"spec": {"size": "big", "color": "green", "name": "NO",
            "port": 1.5, "labels": {"a": 1},
            "items": [{"name": "x"}, {"name": "x"}]}});
        let errors = admit(&schema, &mut bad).errors.join("\n");
        for want in [
            "spec.size: Invalid value: \"big\": spec.size in body must be of type integer: \"string\"",
            "spec.color: Unsupported value: \"green\"",
            "spec.name in body should match '^[a-z]+$'",
            "spec.port in body must be of type integer or string",
            "spec.labels[a] in body must be of type string",
            "spec.items[1]: Duplicate value",
        ] {
            assert!(errors.contains(want), "{want} not in\n{errors}");
        }
        let mut missing = json!({"spec": {}});
        assert_eq!(
            admit(&schema, &mut missing).errors,
            ["spec.size: Required value"]
        );
        let mut big = json!({"spec": {"size": 11}});
        assert!(admit(&schema, &mut big).errors[0].contains("less than or equal to 10"));
    }

    #[test]
    fn a_schema_that_is_not_structural_or_not_enforceable_is_refused() {
        let refused = |schema: Value, why: &str| {
            let errors = check(&schema).unwrap_err().join("\n");
            assert!(errors.contains(why), "{why} not in {errors}");
        };
        refused(
            json!({"type": "object", "properties": {"a": {"description": "x"}}}),
            "properties[a].type: Required value",
        );
        refused(
            json!({"type": "object", "x-kubernetes-validations": [{"rule": "self.a > 1"}]}),
            "CEL validation rules are not supported",
        );
        refused(
            json!({"type": "object", "properties": {"a": {"$ref": "#/x"}}}),
            "$ref is not allowed",
        );
        refused(json!({"type": "string"}), "must be object");
        refused(
            json!({"type": "object", "properties": {"a": {"type": "array"}}}),
            "items: Required value",
        );
        refused(
            json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "(".repeat(2)}}}),
            "not a valid pattern",
        );
        refused(
            json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "a{1000}{1000}"}}}),
            "not a valid pattern",
        );
        refused(
            json!({"type": "object", "properties": {"a": {"type": "integer", "default": "x"}}}),
            "default: Invalid value",
        );
        refused(
            json!({"type": "object", "additionalProperties": false}),
            "must not be false",
        );
        refused(
            json!({"type": "object", "properties": {"a": {"type": "string",
            "anyOf": [{"type": "string"}]}}}),
            "must not be used inside allOf",
        );
        refused(
            json!({"type": "object", "properties": {"metadata": {"type": "object",
            "properties": {"labels": {"type": "object"}}}}}),
            "only name and generateName",
        );
        let mut deep = json!({"type": "string"});
        for _ in 0..60 {
            deep = json!({"type": "object", "properties": {"a": deep}});
        }
        refused(deep, "nests deeper than");
        let wide: serde_json::Map<String, Value> = (0..5000)
            .map(|i| (format!("f{i}"), json!({"type": "string"})))
            .collect();
        refused(
            json!({"type": "object", "properties": wide}),
            "more than 4096 nodes",
        );
        let patterned: serde_json::Map<String, Value> = (0..65)
            .map(|i| {
                (
                    format!("f{i}"),
                    json!({"type": "string", "pattern": "^a+$"}),
                )
            })
            .collect();
        refused(
            json!({"type": "object", "properties": patterned}),
            "at most 64 patterns",
        );
    }

    #[test]
    fn patterns_run_in_linear_time_on_hostile_text() {
        // `(a+)+$` backtracks exponentially in a backtracking engine.
        let schema = json!({"type": "object", "properties": {
            "s": {"type": "string", "pattern": "^(a+)+$"}}});
        check(&schema).unwrap();
        let mut obj = json!({"s": format!("{}!", "a".repeat(100_000))});
        assert_eq!(admit(&schema, &mut obj).errors.len(), 1);
    }

    #[test]
    fn junctors_validate_without_changing_the_object() {
        let schema = json!({"type": "object", "properties": {"v": {"type": "object",
            "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
            "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}}});
        check(&schema).unwrap();
        let mut one = json!({"v": {"a": "x"}});
        assert!(admit(&schema, &mut one).errors.is_empty());
        let mut both = json!({"v": {"a": "x", "b": "y"}});
        assert!(admit(&schema, &mut both).errors[0].contains("exactly one schema in oneOf"));
        assert_eq!(both, json!({"v": {"a": "x", "b": "y"}}));
    }
}
