//! Byte-level BPE tokenizer of a model (tokenizer.json or GGUF metadata), token-for-token
//! identical to Hugging Face `tokenizers`, and the incremental detokenizer of a stream.
//! STUB: API agreed for the workspace; bodies to be written.

use std::path::Path;

/// The special-token strings a chat template sees (`bos_token`, `eos_token`, ...).
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

pub struct Tokenizer {
    _private: (),
}

impl Tokenizer {
    /// A model's tokenizer: a `.gguf` file, a `tokenizer.json`, or a directory holding
    /// tokenizer.json (+ tokenizer_config.json, generation_config.json). Same rules as
    /// shoal's Python `Tokenizer.from_gguf` / `from_pretrained`.
    pub fn from_path(path: &Path) -> Result<Tokenizer, String> {
        let _ = path;
        Err("shoal-tokenizer: not implemented yet".into())
    }
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        let _ = (text, add_special_tokens);
        unimplemented!()
    }
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let _ = (ids, skip_special_tokens);
        unimplemented!()
    }
    /// Vocabulary size with added tokens (Python: `get_vocab_size(with_added_tokens=True)`).
    pub fn vocab_size(&self) -> usize {
        unimplemented!()
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        let _ = token;
        unimplemented!()
    }
    /// The token's string in the vocabulary (byte-level form, e.g. "Ġthe").
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        let _ = id;
        unimplemented!()
    }
    /// End-of-sequence ids (generation_config.json's `eos_token_id`, else the eos token).
    pub fn eos_token_ids(&self) -> &[u32] {
        unimplemented!()
    }
    pub fn special_tokens(&self) -> &SpecialTokens {
        unimplemented!()
    }
    /// The model's chat template source (tokenizer_config.json / GGUF metadata), if any.
    pub fn chat_template(&self) -> Option<&str> {
        unimplemented!()
    }
    /// Whether `id` is a special (added, special=true) token.
    pub fn is_special(&self, id: u32) -> bool {
        let _ = id;
        unimplemented!()
    }
}

/// Turns generated token ids, as they arrive, into text increments; identical to shoal's
/// Python `IncrementalDetokenizer` (primed with the prompt's last tokens; a token ending
/// inside a multi-byte character yields nothing until the character completes).
pub struct IncrementalDetokenizer {
    _private: (),
}

impl IncrementalDetokenizer {
    pub fn new(tokenizer: &Tokenizer, prompt_token_ids: &[u32], skip_special_tokens: bool) -> Self {
        let _ = (tokenizer, prompt_token_ids, skip_special_tokens);
        unimplemented!()
    }
    /// The text that `token_ids` (the next generated tokens) add.
    pub fn update(&mut self, tokenizer: &Tokenizer, token_ids: &[u32]) -> String {
        let _ = (tokenizer, token_ids);
        unimplemented!()
    }
}
