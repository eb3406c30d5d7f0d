//! Building a `Tokenizer` from a GGUF file's metadata (shoal/processing/gguf_tokenizer.py,
//! `Tokenizer.from_gguf`) or a Hugging Face directory (`Tokenizer.from_pretrained`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use crate::added::{AddedToken, AddedVocab};
use crate::bpe::{byte_chars, Bpe, FxMap};
use crate::gguf::{self, Value};
use crate::pretok::Step;
use crate::{SpecialTokens, TemplatePiece, Tokenizer, ADDED, EXISTS, PLAIN, SPECIAL};

const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// Largest token id accepted (real vocabularies stay far below).
const MAX_VOCAB_ID: usize = 1 << 24;

/// Unicode NFC of `s` (borrowed when it already is).
pub fn nfc(s: &str) -> Cow<'_, str> {
    if is_nfc_quick(s.chars()) == IsNormalized::Yes {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(s.nfc().collect())
    }
}

fn nfc_owned(s: &str) -> String {
    nfc(s).into_owned()
}

/// Everything a tokenizer is built from, before the per-id tables.
struct Parts {
    vocab: FxMap<String, u32>,
    merges: Vec<(String, String)>,
    unk_token: Option<String>,
    fuse_unk: bool,
    ignore_merges: bool,
    nfc: bool,
    steps: Vec<Step>,
    templates: Vec<Vec<TemplatePiece>>,
    added: AddedVocab,
}

impl Parts {
    fn new(vocab: FxMap<String, u32>, merges: Vec<(String, String)>) -> Parts {
        Parts {
            vocab,
            merges,
            unk_token: None,
            fuse_unk: false,
            ignore_merges: false,
            nfc: false,
            steps: Vec::new(),
            templates: Vec::new(),
            added: AddedVocab::default(),
        }
    }

    fn add_tokens(&mut self, tokens: Vec<AddedToken>) {
        let normalize: Option<&dyn Fn(&str) -> String> =
            if self.nfc { Some(&nfc_owned) } else { None };
        let size = self.vocab.len();
        self.added.add_tokens(tokens, &self.vocab, size, normalize);
    }

    /// `_add_bos_processor`: make `encode(..., add_special_tokens=True)` start with BOS.
    fn add_bos(&mut self, bos: &str) {
        if self.added.token_to_id(bos, &self.vocab).is_none() {
            self.add_tokens(vec![AddedToken::plain(bos, true)]);
        }
        let id = self
            .added
            .token_to_id(bos, &self.vocab)
            .expect("bos was just added");
        self.templates.push(vec![
            TemplatePiece::Special(vec![id]),
            TemplatePiece::Sequence,
        ]);
    }

    fn build(
        self,
        special_tokens: SpecialTokens,
        eos_ids: Option<Vec<u32>>,
        chat_template: Option<String>,
    ) -> Result<Tokenizer, String> {
        let bpe = Bpe::new(
            &self.vocab,
            &self.merges,
            self.unk_token.as_deref(),
            self.fuse_unk,
            self.ignore_merges,
        )?;
        let vocab_size = self.vocab.len() + self.added.extra_count(&self.vocab);
        let max_id = self
            .vocab
            .values()
            .chain(self.added.by_id.keys())
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        // Per-id tables are dense: an id far past any real vocabulary is a broken file.
        if max_id > MAX_VOCAB_ID {
            return Err(format!("tokenizer: token id {} is past {MAX_VOCAB_ID}", max_id - 1));
        }
        let mut tokens: Vec<Option<Box<str>>> = vec![None; max_id];
        for (token, &id) in &self.vocab {
            tokens[id as usize] = Some(token.as_str().into());
        }
        let mut flags = vec![0u8; max_id];
        for (&id, token) in &self.added.by_id {
            tokens[id as usize] = Some(token.content.as_str().into());
            flags[id as usize] |= ADDED;
        }
        // char -> byte of the ByteLevel decoder (its characters all lie below U+0144).
        let mut char_byte: Vec<Option<u8>> = vec![None; 0x144];
        for (b, c) in byte_chars().iter().enumerate() {
            char_byte[*c as usize] = Some(b as u8);
        }
        let mut token_bytes = Vec::new();
        let mut byte_ranges = Vec::with_capacity(max_id);
        for (id, token) in tokens.iter().enumerate() {
            let start = token_bytes.len() as u32;
            if let Some(token) = token {
                flags[id] |= EXISTS;
                if self.added.special.contains(&**token) {
                    flags[id] |= SPECIAL;
                }
                // ByteLevel decoding: a token whose characters all map takes those bytes,
                // any other its own UTF-8.
                let mapped: Option<Vec<u8>> = token
                    .chars()
                    .map(|c| char_byte.get(c as usize).copied().flatten())
                    .collect();
                match mapped {
                    Some(bytes) => {
                        if flags[id] & ADDED == 0 && std::str::from_utf8(&bytes).is_ok() {
                            flags[id] |= PLAIN;
                        }
                        token_bytes.extend_from_slice(&bytes);
                    }
                    None => token_bytes.extend_from_slice(token.as_bytes()),
                }
            }
            byte_ranges.push((start, token_bytes.len() as u32));
        }
        let mut tokenizer = Tokenizer {
            vocab: self.vocab,
            bpe,
            added: self.added,
            nfc: self.nfc,
            steps: self.steps,
            templates: self.templates,
            vocab_size,
            tokens,
            byte_ranges,
            token_bytes,
            flags,
            eos_ids: Vec::new(),
            special_tokens,
            chat_template,
        };
        tokenizer.eos_ids = match eos_ids {
            Some(ids) => ids,
            None => {
                let eos = tokenizer.special_tokens.eos_token.as_deref();
                eos.and_then(|t| tokenizer.token_to_id(t))
                    .into_iter()
                    .collect()
            }
        };
        Ok(tokenizer)
    }
}

pub fn from_path(path: &Path) -> Result<Tokenizer, String> {
    if path.is_dir() {
        let file = path.join("tokenizer.json");
        if !file.is_file() {
            return Err(format!(
                "tokenizer: {:?} has no tokenizer.json",
                path.display().to_string()
            ));
        }
        return from_pretrained(path, &file);
    }
    if !path.is_file() {
        return Err(format!(
            "tokenizer: {:?} does not exist",
            path.display().to_string()
        ));
    }
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF";
    if is_gguf || path.extension().is_some_and(|e| e == "gguf") {
        return from_gguf(path);
    }
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    from_pretrained(&dir, path)
}

// ------------------------------------------------------------------------------------- GGUF

fn from_gguf(path: &Path) -> Result<Tokenizer, String> {
    let shown = format!("{:?}", path.display().to_string());
    let meta = gguf::read_metadata(path)?;
    let model = meta.get("tokenizer.ggml.model").and_then(Value::as_str);
    if model != Some("gpt2") {
        return Err(format!(
            "tokenizer: {shown} holds a {model:?} tokenizer; only byte-level BPE ('gpt2') GGUF \
             tokenizers are supported (pass --tokenizer with a Hugging Face directory)"
        ));
    }
    let tokens: Vec<String> = string_array(&meta, "tokenizer.ggml.tokens")
        .ok_or_else(|| format!("tokenizer: {shown} has no tokenizer.ggml.tokens"))?;
    let mut merges = Vec::new();
    for m in string_array(&meta, "tokenizer.ggml.merges").unwrap_or_default() {
        let (a, b) = m
            .split_once(' ')
            .ok_or_else(|| format!("tokenizer: {shown}: merge {m:?} is not two tokens"))?;
        merges.push((a.to_string(), b.to_string()));
    }
    // {token: i}: a repeated token keeps its last id.
    let mut vocab: FxMap<String, u32> = FxMap::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), i as u32);
    }
    let mut parts = Parts::new(vocab, merges);
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let gpt2 = || {
        vec![Step::ByteLevel {
            add_prefix_space: false,
            use_regex: true,
        }]
    };
    parts.steps = match pre {
        "default" | "gpt-2" | "gpt2" | "olmo" => gpt2(),
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            let mut steps = vec![Step::Digits { individual: true }];
            steps.extend(gpt2());
            steps
        }
        "llama-bpe" | "llama3" | "smaug-bpe" => split_then_bytes(LLAMA3_SPLIT)?,
        "qwen2" => split_then_bytes(QWEN2_SPLIT)?,
        other => {
            eprintln!("shoal-tokenizer: unknown GGUF pre-tokenizer {other:?}; splitting text as GPT-2 does");
            gpt2()
        }
    };
    parts.nfc = pre == "qwen2";
    let types: Vec<i128> = match meta.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.as_int().unwrap_or(0)).collect(),
        _ => Vec::new(),
    };
    let typed = |kind: i128, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == kind)
            .map(|(t, _)| AddedToken::plain(t, special))
            .collect()
    };
    let (control, user) = (typed(3, true), typed(4, false));
    if !control.is_empty() {
        parts.add_tokens(control);
    }
    if !user.is_empty() {
        parts.add_tokens(user);
    }
    let token_string = |key: &str| -> Option<String> {
        let id = meta.get(&format!("tokenizer.ggml.{key}"))?.as_int()?;
        (0..tokens.len() as i128)
            .contains(&id)
            .then(|| tokens[id as usize].clone())
    };
    let special = SpecialTokens {
        bos_token: token_string("bos_token_id"),
        eos_token: token_string("eos_token_id"),
        unk_token: token_string("unknown_token_id"),
        pad_token: token_string("padding_token_id"),
    };
    if meta
        .get("tokenizer.ggml.add_bos_token")
        .is_some_and(Value::truthy)
    {
        if let Some(bos) = special.bos_token.clone() {
            parts.add_bos(&bos);
        }
    }
    let mut eos_ids: Vec<u32> = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = meta.get(key).and_then(Value::as_int) {
            let id =
                u32::try_from(id).map_err(|_| format!("tokenizer: {shown}: bad {key} {id}"))?;
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
    }
    let template = meta
        .get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .map(String::from);
    parts.build(special, Some(eos_ids), template)
}

fn string_array(meta: &HashMap<String, Value>, key: &str) -> Option<Vec<String>> {
    match meta.get(key)? {
        Value::Array(items) => Some(
            items
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect(),
        ),
        _ => None,
    }
}

fn split_then_bytes(pattern: &str) -> Result<Vec<Step>, String> {
    Ok(vec![
        Step::Split {
            re: compile(pattern)?,
        },
        Step::ByteLevel {
            add_prefix_space: false,
            use_regex: false,
        },
    ])
}

fn compile(pattern: &str) -> Result<fancy_regex::Regex, String> {
    fancy_regex::Regex::new(&crate::pretok::widen_unicode_classes(pattern))
        .map_err(|e| format!("tokenizer: split pattern {pattern:?} does not compile: {e}"))
}

// ---------------------------------------------------------------------- Hugging Face files

fn read_json(path: &Path) -> Result<Option<Json>, String> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("tokenizer: {:?}: {e}", path.display().to_string()))?;
    serde_json::from_str(&text).map(Some).map_err(|e| {
        format!(
            "tokenizer: {:?} is not valid JSON: {e}",
            path.display().to_string()
        )
    })
}

/// A JSON file's top-level object, or an empty one (Python's `_read_json`).
fn read_object(path: &Path) -> Result<serde_json::Map<String, Json>, String> {
    Ok(match read_json(path)? {
        Some(Json::Object(map)) => map,
        _ => serde_json::Map::new(),
    })
}

fn unsupported(what: &str, value: &Json) -> String {
    let mut shown = value.to_string();
    if shown.len() > 200 {
        let mut cut = 200;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push_str("...");
    }
    format!("tokenizer.json: unsupported {what}: {shown} (shoal-tokenizer handles byte-level BPE)")
}

fn type_of(v: &Json) -> &str {
    v.get("type").and_then(Json::as_str).unwrap_or("")
}

fn flag(v: &Json, key: &str, default: bool) -> bool {
    v.get(key).and_then(Json::as_bool).unwrap_or(default)
}

fn from_pretrained(dir: &Path, file: &Path) -> Result<Tokenizer, String> {
    let json = read_json(file)?.ok_or_else(|| {
        format!(
            "tokenizer: {:?} has no tokenizer.json",
            dir.display().to_string()
        )
    })?;
    let mut parts = parse_tokenizer_json(&json)?;
    let config = read_object(&dir.join("tokenizer_config.json"))?;
    let content = |name: &str| -> Option<String> {
        let v = config.get(name)?;
        let v = if v.is_object() { v.get("content")? } else { v };
        v.as_str().map(String::from)
    };
    let special = SpecialTokens {
        bos_token: content("bos_token"),
        eos_token: content("eos_token"),
        unk_token: content("unk_token"),
        pad_token: content("pad_token"),
    };
    let add_bos = config.get("add_bos_token").is_some_and(truthy);
    if let (true, Some(bos)) = (add_bos, special.bos_token.clone()) {
        if !adds_bos(&parts, &bos) {
            parts.add_bos(&bos);
        }
    }
    let template = read_chat_template(dir, &config)?;
    let mut eos_ids = None;
    for name in ["generation_config.json", "config.json"] {
        let eos = read_object(&dir.join(name))?.remove("eos_token_id");
        match eos {
            Some(Json::Number(n)) if n.is_i64() || n.is_u64() => {
                eos_ids = n.as_u64().map(|i| vec![i as u32]);
                break;
            }
            Some(Json::Array(items)) if !items.is_empty() && items.iter().all(Json::is_u64) => {
                eos_ids = Some(items.iter().map(|i| i.as_u64().unwrap() as u32).collect());
                break;
            }
            _ => {}
        }
    }
    parts.build(special, eos_ids, template)
}

/// Python truthiness of a JSON value.
fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64().is_none_or(|f| f != 0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
    }
}

/// `_adds_bos`: whether `encode("a", add_special_tokens=True)` already starts with BOS, i.e.
/// whether the outermost template that puts ids before the text starts with it.
fn adds_bos(parts: &Parts, bos: &str) -> bool {
    let Some(bos_id) = parts.added.token_to_id(bos, &parts.vocab) else {
        return false;
    };
    for template in parts.templates.iter().rev() {
        for piece in template {
            match piece {
                TemplatePiece::Special(ids) if ids.is_empty() => continue,
                TemplatePiece::Special(ids) => return ids[0] == bos_id,
                TemplatePiece::Sequence => break,
            }
        }
    }
    // No template adds anything before the text: it starts with "a" itself.
    parts.vocab.get("a") == Some(&bos_id)
}

fn read_chat_template(
    dir: &Path,
    config: &serde_json::Map<String, Json>,
) -> Result<Option<String>, String> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| format!("tokenizer: {:?}: {e}", jinja.display().to_string()));
    }
    let mut template = config.get("chat_template").filter(|v| truthy(v)).cloned();
    if template.is_none() {
        template = read_object(&dir.join("chat_template.json"))?.remove("chat_template");
    }
    if let Some(Json::Array(items)) = &template {
        let named: Vec<(Option<&str>, Option<&Json>)> = items
            .iter()
            .filter(|t| t.is_object())
            .map(|t| (t.get("name").and_then(Json::as_str), t.get("template")))
            .collect();
        let default = named
            .iter()
            .find(|(n, _)| *n == Some("default"))
            .and_then(|(_, t)| *t);
        template = default
            .filter(|t| truthy(t))
            .or_else(|| named.first().and_then(|(_, t)| *t))
            .cloned();
    }
    Ok(template.and_then(|t| t.as_str().map(String::from)))
}

fn parse_tokenizer_json(json: &Json) -> Result<Parts, String> {
    for key in ["truncation", "padding"] {
        if let Some(v) = json.get(key).filter(|v| !v.is_null()) {
            return Err(unsupported(key, v));
        }
    }
    let model = json.get("model").ok_or("tokenizer.json: no model")?;
    let mtype = type_of(model);
    if !(mtype == "BPE" || (mtype.is_empty() && model.get("merges").is_some())) {
        return Err(unsupported("model", &serde_json::json!({ "type": mtype })));
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if let Some(v) = model
            .get(key)
            .filter(|v| !v.is_null() && v.as_str() != Some(""))
        {
            return Err(unsupported(&format!("BPE {key}"), v));
        }
    }
    if flag(model, "byte_fallback", false) {
        return Err(unsupported("BPE byte_fallback", &Json::Bool(true)));
    }
    if let Some(d) = model
        .get("dropout")
        .filter(|d| !d.is_null() && d.as_f64() != Some(0.0))
    {
        return Err(unsupported("BPE dropout", d));
    }
    let mut vocab: FxMap<String, u32> = FxMap::default();
    for (token, id) in model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or("tokenizer.json: BPE without vocab")?
    {
        let id = id.as_u64().ok_or_else(|| unsupported("vocab id", id))?;
        vocab.insert(token.clone(), id as u32);
    }
    let mut merges = Vec::new();
    for m in model
        .get("merges")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let pair = match m {
            Json::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string())),
            Json::Array(ab) if ab.len() == 2 => match (ab[0].as_str(), ab[1].as_str()) {
                (Some(a), Some(b)) => Some((a.to_string(), b.to_string())),
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| unsupported("merge", m))?);
    }
    let mut parts = Parts::new(vocab, merges);
    parts.unk_token = model
        .get("unk_token")
        .and_then(Json::as_str)
        .map(String::from);
    parts.fuse_unk = flag(model, "fuse_unk", false);
    parts.ignore_merges = flag(model, "ignore_merges", false);

    parts.nfc = match json.get("normalizer") {
        None | Some(Json::Null) => false,
        Some(n) if type_of(n) == "NFC" => true,
        Some(n)
            if type_of(n) == "Sequence"
                && n.get("normalizers")
                    .and_then(Json::as_array)
                    .is_some_and(|l| l.len() == 1 && type_of(&l[0]) == "NFC") =>
        {
            true
        }
        Some(n) => return Err(unsupported("normalizer", n)),
    };
    let pre = json.get("pre_tokenizer").unwrap_or(&Json::Null);
    parts.steps = parse_pre_tokenizer(pre)?;
    let byte_level_last = matches!(parts.steps.last(), Some(Step::ByteLevel { .. }));
    let byte_levels = parts
        .steps
        .iter()
        .filter(|s| matches!(s, Step::ByteLevel { .. }))
        .count();
    if !byte_level_last || byte_levels != 1 {
        return Err(unsupported(
            "pre_tokenizer (ByteLevel must come last, once)",
            pre,
        ));
    }
    match json.get("decoder") {
        Some(d) if type_of(d) == "ByteLevel" => {}
        Some(d) => return Err(unsupported("decoder", d)),
        None => return Err(unsupported("decoder", &Json::Null)),
    }
    parts.templates = parse_post_processor(json.get("post_processor").unwrap_or(&Json::Null))?;

    let mut added = Vec::new();
    for t in json
        .get("added_tokens")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let content = t
            .get("content")
            .and_then(Json::as_str)
            .ok_or_else(|| unsupported("added token", t))?;
        let special = flag(t, "special", false);
        added.push(AddedToken {
            content: content.to_string(),
            special,
            normalized: flag(t, "normalized", !special),
            lstrip: flag(t, "lstrip", false),
            rstrip: flag(t, "rstrip", false),
            single_word: flag(t, "single_word", false),
        });
    }
    parts.add_tokens(added);
    Ok(parts)
}

fn parse_pre_tokenizer(v: &Json) -> Result<Vec<Step>, String> {
    Ok(match type_of(v) {
        "ByteLevel" => vec![Step::ByteLevel {
            add_prefix_space: flag(v, "add_prefix_space", true),
            use_regex: flag(v, "use_regex", true),
        }],
        "Digits" => vec![Step::Digits {
            individual: flag(v, "individual_digits", false),
        }],
        "Split" => {
            let behavior = v.get("behavior").and_then(Json::as_str);
            if behavior != Some("Isolated") || flag(v, "invert", false) {
                return Err(unsupported(
                    "Split pre-tokenizer (only Isolated, not inverted)",
                    v,
                ));
            }
            let pattern = v
                .get("pattern")
                .ok_or_else(|| unsupported("Split pattern", v))?;
            let re = if let Some(p) = pattern.get("Regex").and_then(Json::as_str) {
                compile(p)?
            } else if let Some(s) = pattern.get("String").and_then(Json::as_str) {
                compile(&regex::escape(s))?
            } else {
                return Err(unsupported("Split pattern", pattern));
            };
            vec![Step::Split { re }]
        }
        "Sequence" => {
            let mut steps = Vec::new();
            for p in v
                .get("pretokenizers")
                .and_then(Json::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                steps.extend(parse_pre_tokenizer(p)?);
            }
            steps
        }
        _ => return Err(unsupported("pre_tokenizer", v)),
    })
}

fn parse_post_processor(v: &Json) -> Result<Vec<Vec<TemplatePiece>>, String> {
    Ok(match type_of(v) {
        _ if v.is_null() => Vec::new(),
        // ByteLevel's post-processing only trims offsets.
        "ByteLevel" => Vec::new(),
        "TemplateProcessing" => {
            let specials = v.get("special_tokens").and_then(Json::as_object);
            let mut pieces = Vec::new();
            for p in v
                .get("single")
                .and_then(Json::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                if let Some(s) = p.get("SpecialToken") {
                    let name = s.get("id").and_then(Json::as_str).unwrap_or_default();
                    let ids = specials
                        .and_then(|m| m.get(name))
                        .and_then(|t| t.get("ids"))
                        .and_then(Json::as_array)
                        .ok_or_else(|| unsupported("TemplateProcessing special token", p))?;
                    let ids: Option<Vec<u32>> =
                        ids.iter().map(|i| i.as_u64().map(|i| i as u32)).collect();
                    pieces.push(TemplatePiece::Special(
                        ids.ok_or_else(|| unsupported("TemplateProcessing ids", p))?,
                    ));
                } else if p
                    .get("Sequence")
                    .and_then(|s| s.get("id"))
                    .and_then(Json::as_str)
                    == Some("A")
                {
                    pieces.push(TemplatePiece::Sequence);
                } else {
                    return Err(unsupported("TemplateProcessing piece", p));
                }
            }
            vec![pieces]
        }
        "Sequence" => {
            let mut all = Vec::new();
            for p in v
                .get("processors")
                .and_then(Json::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                all.extend(parse_post_processor(p)?);
            }
            all
        }
        _ => return Err(unsupported("post_processor", v)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_json(pre: Json, post: Json) -> Json {
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [
                {"id": 0, "content": "<s>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null, "pre_tokenizer": pre, "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": {"<s>": 0, "h": 1, "i": 2, "hi": 3, "Ġ": 4, "Ġhi": 5},
                      "merges": [["h", "i"], "Ġ hi"]}
        })
    }

    fn build(json: &Json) -> Result<Tokenizer, String> {
        parse_tokenizer_json(json)?.build(SpecialTokens::default(), None, None)
    }

    #[test]
    fn tokenizer_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<crate::IncrementalDetokenizer>();
    }

    #[test]
    fn tiny_bpe_roundtrip() {
        let pre =
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        let tok = build(&tiny_json(pre, Json::Null)).unwrap();
        assert_eq!(tok.encode("hi hi<s>", true), [3, 5, 0]);
        assert_eq!(tok.decode(&[3, 5, 0], false), "hi hi<s>");
        assert_eq!(tok.decode(&[3, 5, 0], true), "hi hi");
        assert_eq!(tok.decode(&[3, 99], true), "hi"); // unknown ids are left out
        assert_eq!(tok.vocab_size(), 6);
        assert!(tok.is_special(0) && !tok.is_special(3));
    }

    #[test]
    fn template_adds_bos() {
        let pre = serde_json::json!({"type": "ByteLevel"});
        let post = serde_json::json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}});
        let tok = build(&tiny_json(pre, post)).unwrap();
        // add_prefix_space: "hi" -> " hi".
        assert_eq!(tok.encode("hi", true), [0, 5]);
        assert_eq!(tok.encode("hi", false), [5]);
    }

    #[test]
    fn unsupported_components_are_named() {
        let pre = serde_json::json!({"type": "Metaspace", "replacement": "▁"});
        let err = build(&tiny_json(pre, Json::Null)).err().unwrap();
        assert!(
            err.contains("pre_tokenizer") && err.contains("Metaspace"),
            "{err}"
        );
        let pre = serde_json::json!({"type": "ByteLevel"});
        let mut json = tiny_json(pre, Json::Null);
        json["decoder"] = serde_json::json!({"type": "WordPiece"});
        let err = build(&json).err().unwrap();
        assert!(
            err.contains("decoder") && err.contains("WordPiece"),
            "{err}"
        );
    }

    #[test]
    fn detokenizer_waits_for_whole_characters() {
        // "é" is two bytes: Ã (0xC3) and © (0xA9) in the byte-level alphabet.
        let json = serde_json::json!({
            "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false},
            "post_processor": null, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": {"Ã": 0, "©": 1, "a": 2}, "merges": []}
        });
        let tok = build(&json).unwrap();
        assert_eq!(tok.encode("aé", false), [2, 0, 1]);
        let mut d = crate::IncrementalDetokenizer::new(&tok, &[2], false);
        assert_eq!(d.update(&tok, &[0]), "");
        assert_eq!(d.update(&tok, &[1]), "é");
        assert_eq!(d.update(&tok, &[2]), "a");
        // A prompt ending inside "é" is not part of the context.
        let mut d = crate::IncrementalDetokenizer::new(&tok, &[2, 0], false);
        assert_eq!(d.update(&tok, &[1]), "");
        assert_eq!(d.update(&tok, &[2]), "\u{fffd}a");
        assert_eq!(tok.decode(&[0], false), "\u{fffd}");
    }
}
