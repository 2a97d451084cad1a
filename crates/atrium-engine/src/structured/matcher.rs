//! The matcher of a compiled grammar: the ways the text so far can still
//! become a document, each a stack of what comes next, advanced a byte at
//! a time. Its bounds keep a hostile schema or a wandering model from
//! growing it: alternatives followed at once, nesting, whitespace in a
//! row, digits in a number.

use super::{Grammar, Node, NodeId};

/// Alternatives a matcher follows at once (`anyOf`, keys in any order,
/// enum values); past it no more are looked for. Every one kept is a way
/// to a whole document, so dropping some never lets invalid output by.
const MAX_ALTERNATIVES: usize = 64;
/// Items on one alternative's stack: how deep the output may nest.
const MAX_STACK: usize = 96;
/// Whitespace in a row between tokens.
pub(super) const MAX_WS: u8 = 4;
/// Digits in a number, so a model cannot write digits without end; an
/// integer's fit an i64.
pub(super) const MAX_DIGITS: u8 = 24;
const MAX_INTEGER_DIGITS: u8 = 18;

/// What comes next on one alternative, read from the top of its stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Value(NodeId),
    Byte(u8),
    Literal {
        id: u32,
        at: u32,
    },
    /// Inside a string: characters so far, and where in one it is.
    Str {
        node: NodeId,
        len: u32,
        state: StrState,
    },
    Num {
        integer: bool,
        state: NumState,
        digits: u8,
    },
    /// In an object: the keys written so far (a bit per property).
    Members {
        node: NodeId,
        used: u64,
        any: bool,
    },
    FreeMembers {
        any: bool,
    },
    /// In an array, `count` elements so far.
    Elements {
        node: NodeId,
        count: u32,
    },
    Ws(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrState {
    Plain,
    Escape,
    Hex(u8),
    /// Continuation bytes of a UTF-8 character still to come, and the
    /// range the next one must be in (narrower after some lead bytes, so
    /// no overlong form or surrogate gets through).
    Utf8 {
        rest: u8,
        lo: u8,
        hi: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumState {
    Start,
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    /// One digit of exponent, then a second and last (so every number
    /// fits an f64).
    Exp,
    Exp2,
}

impl NumState {
    fn complete(self) -> bool {
        matches!(
            self,
            NumState::Zero | NumState::Int | NumState::Frac | NumState::Exp | NumState::Exp2
        )
    }
}

type Stack = Vec<Item>;

/// Where generated text stands against a grammar: every way it can still
/// go on.
#[derive(Debug, Clone, PartialEq)]
pub struct Matcher {
    stacks: Vec<Stack>,
}

impl Matcher {
    pub(super) fn new(root: NodeId) -> Matcher {
        Matcher {
            stacks: vec![vec![Item::Value(root)]],
        }
    }

    /// The matcher after `bytes`, or `None` if they cannot be part of a
    /// document.
    pub fn feed(&self, g: &Grammar, bytes: &[u8]) -> Option<Matcher> {
        let mut current = self.clone();
        for &b in bytes {
            current = current.step(g, b)?;
        }
        Some(current)
    }

    /// After one byte.
    pub fn step(&self, g: &Grammar, b: u8) -> Option<Matcher> {
        let mut out = Vec::new();
        for stack in &self.stacks {
            advance(g, stack.clone(), b, &mut out);
        }
        out.dedup();
        (!out.is_empty()).then_some(Matcher { stacks: out })
    }

    /// Whether the text so far is a whole document.
    pub fn can_end(&self) -> bool {
        self.stacks.iter().any(|s| ends(s))
    }

    /// Whether the document is whole and nothing may follow.
    pub fn must_end(&self, g: &Grammar) -> bool {
        self.can_end() && (0..=255u8).all(|b| self.step(g, b).is_none())
    }
}

fn ends(stack: &[Item]) -> bool {
    stack.iter().all(|item| match item {
        Item::Ws(_) => true,
        Item::Num { state, .. } => state.complete(),
        _ => false,
    })
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

/// Every stack `stack` becomes on byte `b`, into `out`.
fn advance(g: &Grammar, mut stack: Stack, b: u8, out: &mut Vec<Stack>) {
    // Past the alternatives kept, more are not worth finding.
    if stack.len() > MAX_STACK || out.len() >= MAX_ALTERNATIVES {
        return;
    }
    let Some(top) = stack.pop() else {
        return;
    };
    match top {
        Item::Ws(n) => {
            advance(g, stack.clone(), b, out);
            if n > 0 && is_ws(b) {
                stack.push(Item::Ws(n - 1));
                out.push(stack);
            }
        }
        Item::Byte(x) => {
            if x == b {
                out.push(stack);
            }
        }
        Item::Literal { id, at } => {
            let text = &g.literals[id as usize];
            if text.get(at as usize) == Some(&b) {
                if (at as usize) + 1 < text.len() {
                    stack.push(Item::Literal { id, at: at + 1 });
                }
                out.push(stack);
            }
        }
        Item::Value(node) => expand(g, stack, node, b, out),
        Item::Str { node, len, state } => {
            let Node::Str { min, max } = g.nodes[node as usize] else {
                return;
            };
            let more = |stack: &mut Stack, len: u32, state| {
                stack.push(Item::Str { node, len, state });
            };
            match (state, b) {
                (StrState::Plain, b'"') if len >= min => out.push(stack),
                (StrState::Plain, _) if len >= max => {}
                (StrState::Plain, b'\\') => {
                    more(&mut stack, len, StrState::Escape);
                    out.push(stack);
                }
                (StrState::Plain, 0x20..=0x7f) if b != b'"' => {
                    more(&mut stack, len + 1, StrState::Plain);
                    out.push(stack);
                }
                (StrState::Plain, 0xc2..=0xf4) => {
                    let (rest, lo, hi) = match b {
                        0xc2..=0xdf => (1, 0x80, 0xbf),
                        0xe0 => (2, 0xa0, 0xbf),
                        0xed => (2, 0x80, 0x9f),
                        0xe1..=0xef => (2, 0x80, 0xbf),
                        0xf0 => (3, 0x90, 0xbf),
                        0xf4 => (3, 0x80, 0x8f),
                        _ => (3, 0x80, 0xbf),
                    };
                    more(&mut stack, len + 1, StrState::Utf8 { rest, lo, hi });
                    out.push(stack);
                }
                (StrState::Utf8 { rest, lo, hi }, _) if (lo..=hi).contains(&b) => {
                    let state = if rest > 1 {
                        StrState::Utf8 {
                            rest: rest - 1,
                            lo: 0x80,
                            hi: 0xbf,
                        }
                    } else {
                        StrState::Plain
                    };
                    more(&mut stack, len, state);
                    out.push(stack);
                }
                (StrState::Escape, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                    more(&mut stack, len + 1, StrState::Plain);
                    out.push(stack);
                }
                (StrState::Escape, b'u') => {
                    more(&mut stack, len, StrState::Hex(4));
                    out.push(stack);
                }
                // No `\uD…`: a lone surrogate is not text, and pairs are
                // not worth their state; such characters come as UTF-8.
                (StrState::Hex(4), b'd' | b'D') => {}
                (StrState::Hex(n), _) if b.is_ascii_hexdigit() => {
                    let (len, state) = if n > 1 {
                        (len, StrState::Hex(n - 1))
                    } else {
                        (len + 1, StrState::Plain)
                    };
                    more(&mut stack, len, state);
                    out.push(stack);
                }
                _ => {}
            }
        }
        Item::Num {
            integer,
            state,
            digits,
        } => {
            use NumState::*;
            let next = match (state, b) {
                (Start, b'-') => Some(Minus),
                // `-0` is an integer to JSON Schema but a float to many
                // parsers: an integer never writes it.
                (Minus, b'0') if integer => None,
                (Start | Minus, b'0') => Some(Zero),
                (Start | Minus, b'1'..=b'9') => Some(Int),
                (Int, b'0'..=b'9') => Some(Int),
                (Zero | Int, b'.') if !integer => Some(Dot),
                (Dot | Frac, b'0'..=b'9') => Some(Frac),
                (Zero | Int | Frac, b'e' | b'E') if !integer => Some(E),
                (E, b'+' | b'-') => Some(ESign),
                (E | ESign, b'0'..=b'9') => Some(Exp),
                (Exp, b'0'..=b'9') => Some(Exp2),
                _ => None,
            };
            let digits = digits + u8::from(b.is_ascii_digit());
            let most = if integer {
                MAX_INTEGER_DIGITS
            } else {
                MAX_DIGITS
            };
            match next {
                Some(state) if digits <= most => {
                    let mut more = stack.clone();
                    more.push(Item::Num {
                        integer,
                        state,
                        digits,
                    });
                    out.push(more);
                }
                _ => {}
            }
            // The number may also have ended before this byte.
            if state.complete() {
                advance(g, stack, b, out);
            }
        }
        Item::Members { node, used, any } => {
            let Node::Object(props) = &g.nodes[node as usize] else {
                return;
            };
            let unused = |i: usize| used & (1 << i) == 0;
            if b == b'}'
                && !props
                    .iter()
                    .enumerate()
                    .any(|(i, p)| p.required && unused(i))
            {
                out.push(stack);
                return;
            }
            if any && b != b',' {
                return;
            }
            // Each key not yet written may come next, in any order.
            for (i, p) in props.iter().enumerate().filter(|(i, _)| unused(*i)) {
                let mut s = stack.clone();
                s.extend_from_slice(&[
                    Item::Members {
                        node,
                        used: used | (1 << i),
                        any: true,
                    },
                    Item::Ws(MAX_WS),
                    Item::Value(p.value),
                    Item::Ws(MAX_WS),
                    Item::Byte(b':'),
                    Item::Ws(MAX_WS),
                    Item::Literal { id: p.key, at: 0 },
                ]);
                if any {
                    s.push(Item::Ws(MAX_WS));
                    out.push(s);
                } else {
                    advance(g, s, b, out);
                }
            }
        }
        Item::FreeMembers { any } => {
            if b == b'}' {
                out.push(stack);
                return;
            }
            if any && b != b',' {
                return;
            }
            stack.extend_from_slice(&[
                Item::FreeMembers { any: true },
                Item::Ws(MAX_WS),
                Item::Value(g.any_value),
                Item::Ws(MAX_WS),
                Item::Byte(b':'),
                Item::Ws(MAX_WS),
                Item::Value(g.any_string),
            ]);
            if any {
                stack.push(Item::Ws(MAX_WS));
                out.push(stack);
            } else {
                advance(g, stack, b, out);
            }
        }
        Item::Elements { node, count } => {
            let Node::Array { items, min, max } = g.nodes[node as usize] else {
                return;
            };
            if b == b']' && count >= min {
                out.push(stack);
                return;
            }
            if count >= max {
                return;
            }
            let element = [
                Item::Elements {
                    node,
                    count: count + 1,
                },
                Item::Ws(MAX_WS),
                Item::Value(items),
            ];
            stack.extend_from_slice(&element);
            if count == 0 {
                advance(g, stack, b, out);
            } else if b == b',' {
                stack.push(Item::Ws(MAX_WS));
                out.push(stack);
            }
        }
    }
}

/// `stack` after a value of `node` begins with `b`.
fn expand(g: &Grammar, mut stack: Stack, node: NodeId, b: u8, out: &mut Vec<Stack>) {
    let mut opened = |stack: &mut Stack, open: u8, inside: &[Item]| {
        if b == open {
            stack.extend_from_slice(inside);
            out.push(std::mem::take(stack));
        }
    };
    match &g.nodes[node as usize] {
        Node::Object(_) => opened(
            &mut stack,
            b'{',
            &[
                Item::Members {
                    node,
                    used: 0,
                    any: false,
                },
                Item::Ws(MAX_WS),
            ],
        ),
        Node::FreeObject => opened(
            &mut stack,
            b'{',
            &[Item::FreeMembers { any: false }, Item::Ws(MAX_WS)],
        ),
        Node::Array { .. } => opened(
            &mut stack,
            b'[',
            &[Item::Elements { node, count: 0 }, Item::Ws(MAX_WS)],
        ),
        Node::Str { .. } => opened(
            &mut stack,
            b'"',
            &[Item::Str {
                node,
                len: 0,
                state: StrState::Plain,
            }],
        ),
        Node::Integer | Node::Number => {
            stack.push(Item::Num {
                integer: matches!(g.nodes[node as usize], Node::Integer),
                state: NumState::Start,
                digits: 0,
            });
            advance(g, stack, b, out);
        }
        Node::Boolean => {
            for id in [g.words[0], g.words[1]] {
                let mut s = stack.clone();
                s.push(Item::Literal { id, at: 0 });
                advance(g, s, b, out);
            }
        }
        Node::Null => {
            stack.push(Item::Literal {
                id: g.words[2],
                at: 0,
            });
            advance(g, stack, b, out);
        }
        Node::Literals(ids) => {
            for &id in ids {
                let mut s = stack.clone();
                s.push(Item::Literal { id, at: 0 });
                advance(g, s, b, out);
            }
        }
        Node::AnyOf(ids) => {
            for &id in ids {
                let mut s = stack.clone();
                s.push(Item::Value(id));
                advance(g, s, b, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use serde_json::json;
    use serde_json::Value;

    fn accepts(g: &Grammar, text: &str) -> bool {
        g.start()
            .feed(g, text.as_bytes())
            .is_some_and(|m| m.can_end())
    }

    fn person() -> Grammar {
        Grammar::from_schema(&json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 5, "description": "first name"},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}, "maxItems": 2},
                "score": {"type": ["number", "null"]},
            },
            "required": ["name", "age"],
            "additionalProperties": false,
        }))
        .unwrap()
    }

    #[test]
    fn a_schemas_documents_are_taken_and_nothing_else_is() {
        let g = person();
        for ok in [
            r#"{"name":"Ann","age":41}"#,
            r#"{"age":41,"name":"Ann"}"#,
            r#"{ "name": "Bo\n", "age": -30, "tags": ["a", 3], "score": null }"#,
            r#"{"name":"","age":7,"score":-1.5e+3}"#,
            "{\"name\":\"Zoë\",\"age\":1,\"tags\":[]}",
        ] {
            assert!(accepts(&g, ok), "{ok}");
            serde_json::from_str::<Value>(ok).unwrap();
        }
        for bad in [
            r#"{"name":"Ann"}"#,
            r#"{"name":"Ann","age":1,"name":"Bo"}"#,
            r#"{"name":"Annabel","age":1}"#,
            r#"{"name":"Ann","age":1.5}"#,
            r#"{"name":"Ann","age":1,"tags":["c"]}"#,
            r#"{"name":"Ann","age":1,"tags":["a","b","a"]}"#,
            r#"{"name":"Ann","age":1,"extra":1}"#,
            r#"{"name":"A"nn","age":1}"#,
            " {\"name\":\"A\",\"age\":1}",
            "{\"name\":\"a\tb\",\"age\":1}",
            "{\"name\":\"A\",      \"age\":1}",
            r#"{"name":"A","age":01}"#,
        ] {
            assert!(!accepts(&g, bad), "{bad}");
        }
        let done = g.start().feed(&g, br#"{"name":"A","age":1}"#).unwrap();
        assert!(done.must_end(&g), "nothing may follow a whole document");
        let number = g.start().feed(&g, br#"{"name":"A","age":1"#).unwrap();
        assert!(!number.can_end());
    }

    #[test]
    fn json_object_takes_any_object_and_only_an_object() {
        let g = Grammar::any_object();
        assert!(accepts(
            &g,
            r#"{"a": [1, 2.5e3, "x", true, {"b": {"c": null}}], "d": []}"#
        ));
        assert!(accepts(&g, "{}"));
        for bad in [
            "[1]",
            "\"x\"",
            r#"{"a" 1}"#,
            r#"{"a":1,}"#,
            r#"{a:1}"#,
            "{\"a\":1} ",
        ] {
            assert!(!accepts(&g, bad), "{bad}");
        }
        let digits = format!("{{\"a\":{}", "1".repeat(MAX_DIGITS as usize + 1));
        assert!(g.start().feed(&g, digits.as_bytes()).is_none());
    }

    /// Random walks through what the matcher allows always end in a
    /// document that parses and fits the schema.
    #[test]
    fn whatever_the_matcher_allows_ends_as_a_valid_document() {
        let g = person();
        let alphabet: Vec<u8> = (0x20..0x7f)
            .chain([b'\n', 0xc3, 0xa9, 0xe0, 0x80, 0xa0, 0xed, 0xf4, 0x90])
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut finished = 0;
        for _ in 0..300 {
            let mut m = g.start();
            let mut text = Vec::new();
            for _ in 0..200 {
                if m.can_end() && (m.must_end(&g) || rng.gen_bool(0.3)) {
                    break;
                }
                let options: Vec<(u8, Matcher)> = alphabet
                    .iter()
                    .filter_map(|&b| m.step(&g, b).map(|n| (b, n)))
                    .collect();
                assert!(
                    !options.is_empty(),
                    "stuck after {:?}",
                    String::from_utf8_lossy(&text)
                );
                let (b, next) = options[rng.gen_range(0..options.len())].clone();
                text.push(b);
                m = next;
            }
            if !m.can_end() {
                continue;
            }
            finished += 1;
            let v: Value = serde_json::from_slice(&text)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&text)));
            let o = v.as_object().unwrap();
            assert!(o["name"].as_str().unwrap().chars().count() <= 5, "{v}");
            assert!(o["age"].is_i64() || o["age"].is_u64(), "{v}");
            assert!(o
                .keys()
                .all(|k| ["name", "age", "tags", "score"].contains(&k.as_str())));
            if let Some(tags) = o.get("tags") {
                let tags = tags.as_array().unwrap();
                assert!(tags.len() <= 2);
                assert!(tags
                    .iter()
                    .all(|t| *t == json!("a") || *t == json!("b") || *t == json!(3)));
            }
            if let Some(score) = o.get("score") {
                assert!(score.is_number() || score.is_null());
            }
        }
        assert!(finished > 50, "only {finished} walks finished");
    }
}
