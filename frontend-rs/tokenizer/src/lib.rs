//! Byte-level BPE tokenizer of a model (tokenizer.json or GGUF metadata), token-for-token
//! identical to Hugging Face `tokenizers` as shoal's Python `Tokenizer` configures it, and the
//! incremental detokenizer of a stream (shoal/processing/detokenizer.py).
//!
//! Encoding, as Hugging Face does it: added tokens are split out of the text (leftmost-
//! longest), the rest is normalized (NFC, if the model says so), pre-tokenized into words
//! (Digits / Split / GPT-2's regex), each word's bytes merged by BPE; a post-processor may add
//! BOS. Decoding concatenates the tokens' bytes and decodes them as UTF-8 with U+FFFD for
//! invalid sequences.

mod added;
mod bpe;
pub mod gguf;
mod load;
mod pretok;

use std::borrow::Cow;
use std::path::Path;

use added::AddedVocab;
use bpe::{Bpe, FxMap};
use pretok::Step;

/// The special-token strings a chat template sees (`bos_token`, `eos_token`, ...).
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

/// A post-processor template (`TemplateProcessing`'s `single`): special ids around the text.
#[derive(Debug, Clone)]
enum TemplatePiece {
    Special(Vec<u32>),
    Sequence,
}

// Flags of one id in the per-id table.
const EXISTS: u8 = 1;
const SPECIAL: u8 = 2;
const ADDED: u8 = 4;
/// A byte-level vocabulary entry (not added) whose bytes are complete UTF-8.
const PLAIN: u8 = 8;

pub struct Tokenizer {
    vocab: FxMap<String, u32>,
    bpe: Bpe,
    added: AddedVocab,
    nfc: bool,
    steps: Vec<Step>,
    /// Applied in order when `add_special_tokens` (a Sequence of post-processors).
    templates: Vec<Vec<TemplatePiece>>,
    vocab_size: usize,
    /// Per id: its token string (added tokens first, as `id_to_token`).
    tokens: Vec<Option<Box<str>>>,
    /// Per id: the bytes ByteLevel decoding gives it, as ranges of `token_bytes`.
    byte_ranges: Vec<(u32, u32)>,
    token_bytes: Vec<u8>,
    flags: Vec<u8>,
    eos_ids: Vec<u32>,
    special_tokens: SpecialTokens,
    chat_template: Option<String>,
}

/// Reusable buffers of `encode` (one set per thread).
#[derive(Default)]
struct Scratch {
    splits: Vec<added::Split>,
    inner_splits: Vec<added::Split>,
    buf: String,
    pieces: Vec<(usize, usize)>,
    pieces_scratch: Vec<(usize, usize)>,
}

impl Tokenizer {
    /// A model's tokenizer: a `.gguf` file, a `tokenizer.json`, or a directory holding
    /// tokenizer.json (+ tokenizer_config.json, generation_config.json). Same rules as
    /// shoal's Python `Tokenizer.from_gguf` / `from_pretrained`; `Err` names what is missing
    /// or which tokenizer component is not supported.
    pub fn from_path(path: &Path) -> Result<Tokenizer, String> {
        load::from_path(path)
    }

    /// Token ids of `text`; added-token strings in the text map to their ids. With
    /// `add_special_tokens`, what the post-processor adds (BOS for some models).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
        }
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut s) => self.encode_with(text, add_special_tokens, &mut s),
            // Re-entered on this thread (cannot happen today): fresh buffers.
            Err(_) => self.encode_with(text, add_special_tokens, &mut Scratch::default()),
        })
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool, s: &mut Scratch) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 4);
        self.added.split(text, false, &mut s.splits);
        let splits = std::mem::take(&mut s.splits);
        for &(id, start, end) in &splits {
            if let Some(id) = id {
                ids.push(id);
                continue;
            }
            let piece = &text[start..end];
            let normalized: Cow<str> = if self.nfc {
                load::nfc(piece)
            } else {
                Cow::Borrowed(piece)
            };
            self.added.split(&normalized, true, &mut s.inner_splits);
            let inner = std::mem::take(&mut s.inner_splits);
            for &(id, a, b) in &inner {
                match id {
                    Some(id) => ids.push(id),
                    None => self.encode_words(&normalized[a..b], s, &mut ids),
                }
            }
            s.inner_splits = inner;
        }
        s.splits = splits;
        // Keep the buffers of ordinary prompts, not of one huge one.
        if s.buf.capacity() > 1 << 20 {
            s.buf = String::new();
        }
        if add_special_tokens {
            for template in &self.templates {
                let mut out = Vec::with_capacity(ids.len() + 2);
                for piece in template {
                    match piece {
                        TemplatePiece::Special(special) => out.extend_from_slice(special),
                        TemplatePiece::Sequence => out.extend_from_slice(&ids),
                    }
                }
                ids = out;
            }
        }
        ids
    }

    /// Pre-tokenizes one piece of normalized text and appends its BPE ids.
    fn encode_words(&self, text: &str, s: &mut Scratch, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        s.buf.clear();
        s.buf.push_str(text);
        pretok::pre_tokenize(
            &self.steps,
            &mut s.buf,
            &mut s.pieces,
            &mut s.pieces_scratch,
        );
        for &(a, b) in &s.pieces {
            self.bpe.tokenize(&s.buf.as_bytes()[a..b], &self.vocab, ids);
        }
    }

    /// The text of `ids` as Hugging Face's ByteLevel decoder gives it: unknown ids are left
    /// out, special tokens too when `skip_special_tokens`, invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if let Some(b) = self.token_bytes_of(id, skip_special_tokens) {
                bytes.extend_from_slice(b);
            }
        }
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// The bytes id `id` decodes to; None for an unknown id or a skipped special token.
    fn token_bytes_of(&self, id: u32, skip_special_tokens: bool) -> Option<&[u8]> {
        let flags = *self.flags.get(id as usize)?;
        if flags & EXISTS == 0 || (skip_special_tokens && flags & SPECIAL != 0) {
            return None;
        }
        let (a, b) = self.byte_ranges[id as usize];
        Some(&self.token_bytes[a as usize..b as usize])
    }

    /// Python's `Tokenizer.plain_token_text`: the token's text when it is a byte-level
    /// vocabulary entry (not an added token) whose bytes are complete UTF-8.
    fn plain_text(&self, id: u32) -> Option<&str> {
        let flags = *self.flags.get(id as usize)?;
        if flags & PLAIN == 0 {
            return None;
        }
        let (a, b) = self.byte_ranges[id as usize];
        std::str::from_utf8(&self.token_bytes[a as usize..b as usize]).ok()
    }

    /// Vocabulary size with added tokens (Python: `get_vocab_size(with_added_tokens=True)`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.added.token_to_id(token, &self.vocab)
    }
    /// The token's string in the vocabulary (byte-level form, e.g. "Ġthe").
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize)?.as_deref()
    }
    /// End-of-sequence ids (generation_config.json's `eos_token_id`, else the eos token).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }
    /// The model's chat template source (tokenizer_config.json / GGUF metadata), if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
    /// Whether `id` is a special (added, special=true) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.flags
            .get(id as usize)
            .is_some_and(|f| f & SPECIAL != 0)
    }
    /// The ids of the special tokens, ascending (Python: `all_special_ids`).
    pub fn special_ids(&self) -> Vec<u32> {
        self.added
            .by_id
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect()
    }
    /// The id of the BOS token (`special_tokens().bos_token`), if it is in the vocabulary.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special_tokens
            .bos_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }
}

/// Prompt tokens the decode stream is primed with (detokenizer.py's PROMPT_CONTEXT_TOKENS).
pub const PROMPT_CONTEXT_TOKENS: usize = 6;

/// Turns generated token ids, as they arrive, into text increments; identical to shoal's
/// Python `IncrementalDetokenizer` (primed with the prompt's last tokens; a token ending
/// inside a multi-byte character yields nothing until the character completes).
///
/// Like the Python one: a "plain" token (complete UTF-8 on its own) after text that ended on
/// a character boundary adds its own text; anything else goes through a copy of Hugging
/// Face's `DecodeStream` (decode the window, emit what grew past the previous text).
pub struct IncrementalDetokenizer {
    skip_special_tokens: bool,
    // DecodeStream's state.
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
    /// Tokens must go through the stream (see detokenizer.py).
    pending: bool,
    fast: bool,
}

impl IncrementalDetokenizer {
    pub fn new(tokenizer: &Tokenizer, prompt_token_ids: &[u32], skip_special_tokens: bool) -> Self {
        let context = decode_context(tokenizer, prompt_token_ids);
        let pending = !context.iter().all(|&t| tokenizer.plain_text(t).is_some());
        IncrementalDetokenizer {
            skip_special_tokens,
            ids: context,
            prefix: String::new(),
            prefix_index: 0,
            pending,
            fast: !pending,
        }
    }

    /// The text that `token_ids` (the next generated tokens) add.
    pub fn update(&mut self, tokenizer: &Tokenizer, token_ids: &[u32]) -> String {
        let mut out = String::new();
        for &id in token_ids {
            if !self.pending {
                if let Some(text) = tokenizer.plain_text(id) {
                    out.push_str(text);
                    continue;
                }
            }
            match self.step(tokenizer, id) {
                Some(piece) if !piece.is_empty() => {
                    out.push_str(&piece);
                    self.pending = !self.fast;
                }
                _ => self.pending = true,
            }
        }
        out
    }

    /// Hugging Face's `step_decode_stream` for one id.
    fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Option<String> {
        let skip = self.skip_special_tokens;
        if self.prefix.is_empty() && !self.ids.is_empty() {
            let new_prefix = tokenizer.decode(&self.ids, skip);
            if !new_prefix.ends_with('\u{fffd}') {
                self.prefix = new_prefix;
                self.prefix_index = self.ids.len();
            }
        }
        self.ids.push(id);
        let string = tokenizer.decode(&self.ids, skip);
        if string.len() > self.prefix.len() && !string.ends_with('\u{fffd}') {
            // Python raises on a text that no longer starts with the previous one; a byte-level
            // decode cannot produce that, so take the bytes past the old length if it happens.
            let new_text = match string.strip_prefix(self.prefix.as_str()) {
                Some(rest) => rest.to_string(),
                None => string.get(self.prefix.len()..).unwrap_or("").to_string(),
            };
            let new_prefix_index = self.ids.len() - self.prefix_index;
            self.ids.drain(..self.prefix_index);
            self.prefix = tokenizer.decode(&self.ids, skip);
            self.prefix_index = new_prefix_index;
            Some(new_text)
        } else {
            None
        }
    }
}

/// The prompt tokens the stream is primed with: the last `PROMPT_CONTEXT_TOKENS`, less those
/// of a broken character at the end (a token-id prompt can end inside one).
fn decode_context(tokenizer: &Tokenizer, prompt: &[u32]) -> Vec<u32> {
    let mut context = prompt[prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..].to_vec();
    while !context.is_empty() && tokenizer.decode(&context, false).ends_with('\u{fffd}') {
        context.pop();
    }
    context
}
