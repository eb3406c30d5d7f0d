//! Renders chat templates from JSON lines, for tests that compare shoal-template with
//! shoal's Python renderer.
//!
//! Each stdin line is `{"template": str, "messages": [...], "add_generation_prompt": bool,
//! "bos_token": str|null, "eos_token": str|null, "extra": {...}}`; each answer line is
//! `{"text": str}` or `{"error": str, "raised": bool}` (`raised`: the template's own
//! `raise_exception`). With `"prepare": true` the messages are as the client sent them and
//! go through `ChatTemplate::render_chat` (shoal's checks and normalisation first); the
//! error is then that path's text. A compile error is an error line; the tool never panics
//! on input.

use std::io::{BufRead, Write};

use serde_json::{json, Value};
use shoal_template::{ChatTemplate, RenderError};

fn answer(line: &str, cache: &mut Option<(String, ChatTemplate)>) -> Value {
    let request: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return json!({"error": format!("bad request line: {}", e), "raised": false}),
    };
    let Some(source) = request.get("template").and_then(Value::as_str) else {
        return json!({"error": "bad request line: 'template' must be a string", "raised": false});
    };
    // Consecutive requests usually share a template: compile it once.
    if !matches!(cache.as_ref(), Some((s, _)) if s == source) {
        match ChatTemplate::compile(source) {
            Ok(t) => *cache = Some((source.to_string(), t)),
            Err(e) => {
                *cache = None;
                return json!({"error": e, "raised": false});
            }
        }
    }
    let Some((_, template)) = cache.as_ref() else {
        return json!({"error": "internal: no compiled template", "raised": false});
    };
    let token = |name: &str| request.get(name).and_then(Value::as_str);
    if request.get("prepare").and_then(Value::as_bool) == Some(true) {
        let result = template.render_chat(
            request.get("messages").unwrap_or(&Value::Null),
            request
                .get("add_generation_prompt")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            token("bos_token"),
            token("eos_token"),
            request.get("extra").unwrap_or(&Value::Null),
        );
        return match result {
            Ok(text) => json!({"text": text}),
            Err(e) => json!({"error": e, "raised": false}),
        };
    }
    let result = template.render_detailed(
        request.get("messages").unwrap_or(&Value::Null),
        request
            .get("add_generation_prompt")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        token("bos_token"),
        token("eos_token"),
        request.get("extra").unwrap_or(&Value::Null),
    );
    match result {
        Ok(text) => json!({"text": text}),
        Err(RenderError::Raised(m)) => json!({"error": m, "raised": true}),
        Err(RenderError::Error(m)) => json!({"error": m, "raised": false}),
    }
}

fn main() {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut cache = None;
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            answer(&line, &mut cache)
        }))
        .unwrap_or_else(
            |_| json!({"error": "internal error (panic) in shoal-template", "raised": false}),
        );
        if writeln!(out, "{}", reply)
            .and_then(|_| out.flush())
            .is_err()
        {
            break;
        }
    }
}
