//! A chat template (a Jinja subset) compiled once and rendered per request, identically to
//! shoal's Python `render_chat` (jinja2 in an immutable sandbox with `trim_blocks`,
//! `lstrip_blocks` and loop controls, shoal's `tojson`, `raise_exception` and
//! `strftime_now`). A template outside the subset fails at compile time (start-up), never
//! renders a wrong prompt.
//!
//! Modules: `lexer` (source -> tokens, whitespace control), `parser` (tokens -> tree, the
//! subset check), `eval` + `filters` (the renderer), `value` (Python's value semantics).

mod eval;
mod filters;
mod lexer;
pub mod messages;
mod parser;
mod value;

pub use messages::prepare_messages;

use value::{Builtin, Value};

/// A compiled chat template. `Send + Sync`: compile once, render from any thread.
#[derive(Debug)]
pub struct ChatTemplate {
    source: String,
    nodes: Vec<parser::Node>,
}

impl ChatTemplate {
    /// Parse `source`; `Err` names what is unsupported (line and construct).
    pub fn compile(source: &str) -> Result<ChatTemplate, String> {
        let tokens = lexer::tokenize(source)?;
        let nodes = parser::parse(tokens)?;
        Ok(ChatTemplate {
            source: source.to_string(),
            nodes,
        })
    }

    /// The template's source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The whole of Python's `render_chat` but for error attribution: `messages` as the
    /// client sent them are checked and normalised ([`prepare_messages`], with `extra`'s
    /// `tools`), then rendered. `Err` is the Python side's text: a validation error
    /// (`messages[2].content: ...`) as is, a render error as `chat_template: <detail>`
    /// (Python names the message instead where it can pin the failure on one).
    pub fn render_chat(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        extra: &serde_json::Value,
    ) -> Result<String, String> {
        let prepared = prepare_messages(&self.source, messages, extra.get("tools"))?;
        self.render(
            &prepared,
            add_generation_prompt,
            bos_token,
            eos_token,
            extra,
        )
        .map_err(|e| format!("chat_template: {}", e))
    }

    /// Render with the same variables as the Python side: `messages` (a JSON array of
    /// message objects as the API received them, after shoal's normalisation),
    /// `add_generation_prompt`, `bos_token`, `eos_token`, and `extra` (tools, ...; an
    /// object whose keys become variables). `Err` for a render-time error (e.g. the
    /// template's `raise_exception`), the message being the template's.
    ///
    /// As in `render_chat`, `unk_token` and `pad_token` are defined (none) unless `extra`
    /// names them, a missing `bos_token`/`eos_token` is none (prints "None"), and `extra`
    /// overrides the special tokens but not `messages`/`add_generation_prompt`.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        extra: &serde_json::Value,
    ) -> Result<String, String> {
        self.render_detailed(messages, add_generation_prompt, bos_token, eos_token, extra)
            .map_err(RenderError::into_message)
    }

    /// [`ChatTemplate::render`], telling the template's own `raise_exception` apart from
    /// other failures.
    pub fn render_detailed(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        extra: &serde_json::Value,
    ) -> Result<String, RenderError> {
        if !Value::json_fits(messages) || !Value::json_fits(extra) {
            return Err(RenderError::Error(
                "integers beyond 64 bits are not supported by shoal's template subset".into(),
            ));
        }
        let token = |t: Option<&str>| t.map_or(Value::None, Value::str);
        let mut root: Vec<(String, Value)> = vec![
            (
                "raise_exception".into(),
                Value::Builtin(Builtin::RaiseException),
            ),
            ("strftime_now".into(), Value::Builtin(Builtin::StrftimeNow)),
            ("namespace".into(), Value::Builtin(Builtin::Namespace)),
            ("range".into(), Value::Builtin(Builtin::Range)),
            ("dict".into(), Value::Builtin(Builtin::Dict)),
            ("bos_token".into(), token(bos_token)),
            ("eos_token".into(), token(eos_token)),
            ("unk_token".into(), Value::None),
            ("pad_token".into(), Value::None),
        ];
        match extra {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    root.push((k.clone(), Value::from_json(v)));
                }
            }
            serde_json::Value::Null => {}
            _ => return Err(RenderError::Error("extra: must be a JSON object".into())),
        }
        root.push((
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        ));
        root.push(("messages".into(), Value::from_json(messages)));
        eval::Renderer::new(root)
            .render(&self.nodes)
            .map_err(|f| match f {
                eval::Fail::Raise(m) => RenderError::Raised(m),
                other => RenderError::Error(other.message()),
            })
    }
}

/// Why a render failed.
#[derive(Debug, Clone, PartialEq)]
pub enum RenderError {
    /// The template called `raise_exception(message)`.
    Raised(String),
    /// Anything else (an undefined value used, a type error, ...), with its line.
    Error(String),
}

impl RenderError {
    pub fn into_message(self) -> String {
        match self {
            RenderError::Raised(m) | RenderError::Error(m) => m,
        }
    }
}

#[cfg(test)]
mod tests;
