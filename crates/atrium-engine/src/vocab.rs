//! What each token writes, as bytes, and which tokens a structured
//! output's matcher allows next. GGUF stores GPT-2 byte-level tokens as
//! text in which every byte is one character (a space is `Ġ`); they are
//! mapped back here once per model. Control tokens write nothing a
//! grammar could take, so they are never allowed; the end of text is the
//! batcher's to allow when the document is whole.
//!
//! Which tokens fit is found by walking a trie of the tokens' bytes with
//! the matcher: a prefix no document can take cuts off every token that
//! starts with it.

use crate::structured::{Grammar, Matcher};

pub(crate) struct Vocab {
    bytes: Vec<Option<Box<[u8]>>>,
    trie: Vec<TrieNode>,
}

#[derive(Default)]
struct TrieNode {
    children: Vec<(u8, u32)>,
    /// Tokens whose bytes end here.
    tokens: Vec<u32>,
}

/// GPT-2's byte ↔ character table: printable bytes are themselves; the
/// rest are 256 onwards, in byte order.
fn byte_of_char() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                u32::from(b)
            } else {
                next += 1;
                next - 1
            };
            (char::from_u32(c).unwrap_or('\u{fffd}'), b)
        })
        .collect()
}

impl Vocab {
    /// From the GGUF token list and types (3: control).
    pub(crate) fn new(tokens: &[String], types: &[i64]) -> Vocab {
        let table = byte_of_char();
        let bytes: Vec<Option<Box<[u8]>>> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if types.get(i) == Some(&3) || t.is_empty() {
                    return None;
                }
                t.chars()
                    .map(|c| table.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .map(Vec::into_boxed_slice)
            })
            .collect();
        let mut trie = vec![TrieNode::default()];
        for (id, b) in bytes.iter().enumerate() {
            let Some(b) = b else { continue };
            let mut at = 0usize;
            for &byte in b.iter() {
                at = match trie[at].children.iter().find(|(c, _)| *c == byte) {
                    Some(&(_, n)) => n as usize,
                    None => {
                        trie.push(TrieNode::default());
                        let n = trie.len() - 1;
                        trie[at].children.push((byte, n as u32));
                        n
                    }
                };
            }
            trie[at].tokens.push(id as u32);
        }
        Vocab { bytes, trie }
    }

    /// What `token` writes, unless it is a control token.
    pub(crate) fn bytes(&self, token: u32) -> Option<&[u8]> {
        self.bytes.get(token as usize)?.as_deref()
    }

    /// Every token whose bytes `matcher` can take next.
    pub(crate) fn allowed(&self, g: &Grammar, matcher: &Matcher) -> Vec<u32> {
        let mut out = Vec::new();
        let mut todo = vec![(0usize, matcher.clone())];
        while let Some((at, m)) = todo.pop() {
            for &(byte, child) in &self.trie[at].children {
                if let Some(next) = m.step(g, byte) {
                    out.extend_from_slice(&self.trie[child as usize].tokens);
                    todo.push((child as usize, next));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_tokens_read_back_as_their_bytes() {
        let tokens: Vec<String> = [
            "<|im_end|>",
            "{\"",
            "Ġ\"",
            "ĠĠ",
            "Ã©",
            "na",
            "me",
            "\":",
            "Ċ",
        ]
        .map(String::from)
        .to_vec();
        let types = [3, 1, 1, 1, 1, 1, 1, 1, 1];
        let v = Vocab::new(&tokens, &types);
        assert_eq!(v.bytes(0), None, "a control token writes nothing");
        assert_eq!(v.bytes(2), Some(&b" \""[..]));
        assert_eq!(v.bytes(3), Some(&b"  "[..]));
        assert_eq!(v.bytes(4), Some("é".as_bytes()));
        assert_eq!(v.bytes(8), Some(&b"\n"[..]));

        let g = Grammar::from_schema(&serde_json::json!({"type": "object",
            "properties": {"name": {"type": "string"}}, "required": ["name"]}))
        .unwrap();
        let mut allowed = v.allowed(&g, &g.start());
        allowed.sort_unstable();
        assert_eq!(allowed, [1], "only {{\" can start it");
        let m = g.start().feed(&g, b"{\"").unwrap();
        let mut allowed = v.allowed(&g, &m);
        allowed.sort_unstable();
        assert_eq!(allowed, [5], "then only the key");
    }
}
