//! Generated tokens to text deltas for streaming.

use tokenizers::Tokenizer;

/// Turns a growing list of generated tokens into text deltas, holding back
/// bytes that do not yet form whole characters and text that could still
/// become a stop sequence.
pub(crate) struct Detokenizer {
    tokens: Vec<u32>,
    emitted: usize,
    stop: Vec<String>,
    hold_back: usize,
}

impl Detokenizer {
    pub(crate) fn new(stop: Vec<String>) -> Self {
        let hold_back = stop.iter().map(|s| s.len()).max().unwrap_or(0);
        Detokenizer {
            tokens: Vec::new(),
            emitted: 0,
            stop,
            hold_back,
        }
    }

    /// Adds a token; returns (delta to emit, whether a stop sequence ended
    /// the text).
    pub(crate) fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> (String, bool) {
        self.tokens.push(token);
        let text = tokenizer.decode(&self.tokens, true).unwrap_or_default();
        if text.ends_with('\u{FFFD}') {
            return (String::new(), false);
        }
        if let Some(cut) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            let delta = text.get(self.emitted..cut).unwrap_or("").to_string();
            self.emitted = cut.max(self.emitted);
            return (delta, true);
        }
        let mut safe = text.len().saturating_sub(self.hold_back).max(self.emitted);
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        let delta = text.get(self.emitted..safe).unwrap_or("").to_string();
        self.emitted = safe.max(self.emitted);
        (delta, false)
    }

    /// The text still held back, at the end.
    pub(crate) fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        let text = tokenizer.decode(&self.tokens, true).unwrap_or_default();
        let rest = text
            .get(self.emitted..)
            .unwrap_or("")
            .trim_end_matches('\u{FFFD}')
            .to_string();
        self.emitted = text.len();
        rest
    }
}
