//! `shoal-tokenizer-tool <model path>`: the tokenizer over JSON lines, for tests and checks.
//!
//! Each stdin line is one request; each gets one stdout line:
//! - `{"op":"encode","text":..,"add_special_tokens":bool}` -> `{"ids":[..]}`
//! - `{"op":"decode","ids":[..],"skip_special_tokens":bool}` -> `{"text":..}`
//! - `{"op":"stream","prompt_ids":[..],"ids":[..],"skip_special_tokens":bool}` ->
//!   `{"pieces":[..]}` (the detokenizer's increment for each id in turn)
//! - `{"op":"info"}` -> vocab size, eos ids, special tokens and ids, has_chat_template
//! - `{"op":"bench","texts":[..],"repeat":n}` -> `{"seconds":..,"tokens":..}` (encode timing)
//!
//! A bad request, or a model that does not load, answers `{"error": ".."}`.

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

use serde_json::{json, Value};
use shoal_tokenizer::{IncrementalDetokenizer, Tokenizer};

fn ids_of(v: &Value, key: &str) -> Result<Vec<u32>, String> {
    let items = v
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{key:?}: a list of ids is required"))?;
    items
        .iter()
        .map(|i| {
            i.as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| format!("{key:?}: bad id {i}"))
        })
        .collect()
}

fn flag(v: &Value, key: &str, default: bool) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(default)
}

fn handle(tok: &Tokenizer, req: &Value) -> Result<Value, String> {
    let op = req.get("op").and_then(Value::as_str).unwrap_or("");
    Ok(match op {
        "encode" => {
            let text = req
                .get("text")
                .and_then(Value::as_str)
                .ok_or("\"text\": a string is required")?;
            json!({ "ids": tok.encode(text, flag(req, "add_special_tokens", true)) })
        }
        "decode" => {
            let ids = ids_of(req, "ids")?;
            json!({ "text": tok.decode(&ids, flag(req, "skip_special_tokens", true)) })
        }
        "stream" => {
            let prompt = ids_of(req, "prompt_ids")?;
            let ids = ids_of(req, "ids")?;
            let mut detok =
                IncrementalDetokenizer::new(tok, &prompt, flag(req, "skip_special_tokens", true));
            let pieces: Vec<String> = ids.iter().map(|&id| detok.update(tok, &[id])).collect();
            json!({ "pieces": pieces })
        }
        "info" => {
            let s = tok.special_tokens();
            json!({
                "vocab_size": tok.vocab_size(),
                "eos_token_ids": tok.eos_token_ids(),
                "bos_token_id": tok.bos_token_id(),
                "special_tokens": {
                    "bos_token": s.bos_token, "eos_token": s.eos_token,
                    "unk_token": s.unk_token, "pad_token": s.pad_token,
                },
                "special_ids": tok.special_ids(),
                "has_chat_template": tok.chat_template().is_some(),
                "chat_template": tok.chat_template(),
            })
        }
        "bench" => {
            let texts: Vec<&str> = req
                .get("texts")
                .and_then(Value::as_array)
                .ok_or("\"texts\": a list of strings is required")?
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let repeat = req.get("repeat").and_then(Value::as_u64).unwrap_or(1);
            let start = std::time::Instant::now();
            let mut tokens = 0usize;
            for _ in 0..repeat {
                for t in &texts {
                    tokens += tok.encode(t, false).len();
                }
            }
            json!({ "seconds": start.elapsed().as_secs_f64(), "tokens": tokens })
        }
        other => return Err(format!("unknown op {other:?}")),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if args.len() != 2 {
        eprintln!("usage: shoal-tokenizer-tool <model path (.gguf, tokenizer.json or directory)>");
        std::process::exit(2);
    }
    let tokenizer = Tokenizer::from_path(Path::new(&args[1]));
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match &tokenizer {
            Err(e) => json!({ "error": e }),
            Ok(tok) => match serde_json::from_str::<Value>(&line) {
                Err(e) => json!({ "error": format!("bad request: {e}") }),
                Ok(req) => handle(tok, &req).unwrap_or_else(|e| json!({ "error": e })),
            },
        };
        if writeln!(out, "{reply}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
}
