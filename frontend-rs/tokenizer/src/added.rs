//! Added tokens (special or not): Hugging Face's `AddedVocabulary`. Their strings are split
//! out of the text before anything else, leftmost-longest, each with its own id.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

use crate::bpe::FxMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedToken {
    pub content: String,
    pub special: bool,
    /// Matched in the normalized text (after the normalizer) instead of the raw text.
    pub normalized: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    pub single_word: bool,
}

impl AddedToken {
    /// As `AddedToken(content, special=special, normalized=False)`.
    pub fn plain(content: &str, special: bool) -> AddedToken {
        AddedToken {
            content: content.to_string(),
            special,
            normalized: false,
            lstrip: false,
            rstrip: false,
            single_word: false,
        }
    }
}

/// Leftmost-longest matching of a few fixed strings (daachorse's `LeftmostLongest`).
#[derive(Default)]
struct Matcher {
    patterns: Vec<(String, u32)>,
    /// Pattern indices by first byte, longest first.
    by_first: Vec<Vec<usize>>,
}

impl Matcher {
    fn new(mut patterns: Vec<(String, u32)>) -> Option<Matcher> {
        if patterns.is_empty() {
            return None;
        }
        // Equal strings: the first one built wins (any one is a valid answer to the trie).
        patterns.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        let mut by_first = vec![Vec::new(); 256];
        for (k, (p, _)) in patterns.iter().enumerate() {
            by_first[p.as_bytes()[0] as usize].push(k);
        }
        Some(Matcher { patterns, by_first })
    }

    /// The next match at or after `from`: (start, end, id).
    fn find(&self, text: &str, from: usize) -> Option<(usize, usize, u32)> {
        let b = text.as_bytes();
        for i in from..b.len() {
            let candidates = &self.by_first[b[i] as usize];
            for &k in candidates {
                let (p, id) = &self.patterns[k];
                if b[i..].starts_with(p.as_bytes()) {
                    return Some((i, i + p.len(), *id));
                }
            }
        }
        None
    }
}

#[derive(Default)]
pub struct AddedVocab {
    /// id -> token, as `get_added_tokens_decoder()`.
    pub by_id: BTreeMap<u32, AddedToken>,
    /// content -> id.
    pub by_content: HashMap<String, u32>,
    /// Contents of the special tokens (decode's skip_special_tokens looks strings up here).
    pub special: HashSet<String>,
    /// id -> normalized content, for normalized tokens the normalizer changes.
    normalized_cache: HashMap<u32, String>,
    raw: Option<Matcher>,
    normalized: Option<Matcher>,
}

/// One piece of a split: an added token's id, or text to tokenize.
pub type Split = (Option<u32>, usize, usize);

fn word_regexes() -> &'static [regex::Regex; 4] {
    static RE: OnceLock<[regex::Regex; 4]> = OnceLock::new();
    RE.get_or_init(|| [r"\w$", r"^\w", r"\s*$", r"^\s*"].map(|p| regex::Regex::new(p).unwrap()))
}

impl AddedVocab {
    pub fn token_to_id(&self, token: &str, model: &FxMap<String, u32>) -> Option<u32> {
        self.by_content
            .get(token)
            .or_else(|| model.get(token))
            .copied()
    }

    /// Hugging Face's `AddedVocabulary::add_tokens`: a token already in the vocabulary keeps
    /// its id; a new one gets the next id past the model's vocabulary and earlier additions.
    pub fn add_tokens(
        &mut self,
        tokens: impl IntoIterator<Item = AddedToken>,
        model: &FxMap<String, u32>,
        model_size: usize,
        normalize: Option<&dyn Fn(&str) -> String>,
    ) {
        let model_size = model_size as u32;
        let mut next_id = match self.by_id.keys().next_back() {
            None => model_size,
            Some(&max) if max >= model_size || model_size == 0 => max + 1,
            Some(_) => model_size,
        };
        for token in tokens {
            if token.content.is_empty() {
                continue;
            }
            if let Some(id) = self.by_content.get(&token.content) {
                if self.by_id.get(id) == Some(&token) {
                    continue;
                }
            }
            let id = match self.token_to_id(&token.content, model) {
                Some(id) => id,
                None => {
                    next_id += 1;
                    next_id - 1
                }
            };
            if token.normalized {
                if let Some(n) = normalize {
                    let normed = n(&token.content);
                    if normed != token.content {
                        self.normalized_cache.insert(id, normed);
                    }
                }
            }
            self.by_content.insert(token.content.clone(), id);
            if token.special {
                self.special.insert(token.content.clone());
            }
            self.by_id.insert(id, token);
        }
        self.refresh();
    }

    fn refresh(&mut self) {
        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        for (id, token) in &self.by_id {
            if token.normalized {
                let p = self.normalized_cache.get(id).unwrap_or(&token.content);
                if !p.is_empty() {
                    normalized.push((p.clone(), *id));
                }
            } else {
                raw.push((token.content.clone(), *id));
            }
        }
        self.raw = Matcher::new(raw);
        self.normalized = Matcher::new(normalized);
    }

    /// Splits `text` around the added tokens matched in raw text (`normalized_set` false) or
    /// in normalized text (true): Hugging Face's `find_matches`, lstrip / rstrip /
    /// single_word included.
    pub fn split(&self, text: &str, normalized_set: bool, out: &mut Vec<Split>) {
        out.clear();
        let matcher = if normalized_set {
            &self.normalized
        } else {
            &self.raw
        };
        let Some(matcher) = matcher else {
            out.push((None, 0, text.len()));
            return;
        };
        let mut start_offset = 0;
        let mut from = 0;
        while let Some((mstart, mend, id)) = matcher.find(text, from) {
            from = mend;
            let token = &self.by_id[&id];
            let (mut start, mut stop) = (mstart, mend);
            if token.single_word {
                let re = word_regexes();
                let start_space = start == 0 || !re[0].is_match(&text[..start]);
                let stop_space = stop == text.len() || !re[1].is_match(&text[stop..]);
                if !start_space || !stop_space {
                    continue;
                }
            }
            if token.lstrip {
                let newstart = word_regexes()[2]
                    .find(&text[..start])
                    .map_or(start, |m| m.start());
                start = newstart.max(start_offset);
            }
            if token.rstrip {
                stop += word_regexes()[3].find(&text[stop..]).map_or(0, |m| m.end());
            }
            if start_offset < start {
                out.push((None, start_offset, start));
            }
            out.push((Some(id), start, stop));
            start_offset = stop;
        }
        if start_offset != text.len() {
            out.push((None, start_offset, text.len()));
        }
    }

    /// `get_vocab_size(with_added_tokens=True)` less the model's size: added contents that are
    /// not model tokens.
    pub fn extra_count(&self, model: &FxMap<String, u32>) -> usize {
        self.by_content
            .keys()
            .filter(|t| !model.contains_key(t.as_str()))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab_with(tokens: Vec<AddedToken>) -> AddedVocab {
        let model: FxMap<String, u32> = [("a".to_string(), 0u32)].into_iter().collect();
        let mut v = AddedVocab::default();
        v.add_tokens(tokens, &model, 1, None);
        v
    }

    fn pieces<'a>(v: &AddedVocab, text: &'a str) -> Vec<(Option<u32>, &'a str)> {
        let mut out = Vec::new();
        v.split(text, false, &mut out);
        out.into_iter()
            .map(|(id, s, e)| (id, &text[s..e]))
            .collect()
    }

    #[test]
    fn leftmost_longest_and_ids() {
        let v = vocab_with(vec![
            AddedToken::plain("<|im", true),
            AddedToken::plain("<|im_start|>", true),
            AddedToken::plain("a", false),
        ]);
        assert_eq!(v.by_content["<|im"], 1);
        assert_eq!(v.by_content["<|im_start|>"], 2);
        assert_eq!(v.by_content["a"], 0); // already a model token
        assert_eq!(
            pieces(&v, "x<|im_start|>y<|imz"),
            [
                (None, "x"),
                (Some(2), "<|im_start|>"),
                (None, "y"),
                (Some(1), "<|im"),
                (None, "z")
            ]
        );
        assert_eq!(
            v.extra_count(&[("a".to_string(), 0u32)].into_iter().collect()),
            2
        );
    }

    #[test]
    fn strip_flags() {
        let mut t = AddedToken::plain("<m>", true);
        t.lstrip = true;
        t.rstrip = true;
        let v = vocab_with(vec![t]);
        assert_eq!(
            pieces(&v, "x  <m>  y"),
            [(None, "x"), (Some(1), "  <m>  "), (None, "y")]
        );
    }
}
