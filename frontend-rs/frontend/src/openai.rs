//! The request bodies of /v1/completions and /v1/chat/completions: decoded from JSON with the
//! Python server's rules and messages (shoal/api/protocol.py, msgspec's "Expected `int`, got
//! `str` - at `$.n`"), validated into `SamplingParams` (shoal/sampling_params.py checks), and
//! the features this frontend does not implement refused by name.

use serde_json::{Map, Value};
use shoal_wire::SamplingParams;

use crate::errors::ApiError;

/// Bounds on one HTTP request's work (shoal/api/protocol.py).
pub const MAX_N: i64 = 128;
pub const MAX_SEQUENCES_PER_REQUEST: i64 = 1024;

/// Request fields of the Python server that this frontend refuses (400 naming them) when
/// they are set to anything but their "off" value.
const UNSUPPORTED_COMMON: &[&str] = &[
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "prompt_logprobs",
];
const UNSUPPORTED_COMPLETION: &[&str] = &["echo", "prompt_embeds", "suffix"];
const UNSUPPORTED_CHAT: &[&str] = &["tools", "continue_final_message"];

/// A field this frontend does not implement.
pub fn unsupported(field: &str) -> ApiError {
    ApiError::bad(
        field,
        format!("{field} is not supported by the native frontend (--frontend rust); use --frontend python"),
    )
}

/// msgspec's name of a JSON value's type.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn expected(what: &str, got: &Value, path: &str) -> ApiError {
    ApiError::invalid(format!(
        "Expected `{what}`, got `{}` - at `$.{path}`",
        type_name(got)
    ))
}

/// The JSON object of a request body; 400 for malformed JSON or another top-level type.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::new(
            400,
            "the request body is empty; expected a JSON object",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::new(
            400,
            format!("Expected `object`, got `{}`", type_name(&other)),
        )),
        Err(e) => Err(ApiError::new(
            400,
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

/// Typed access to a body's fields with msgspec's error messages.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name)
    }

    fn present(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn int_value(v: &Value) -> Option<i64> {
        match v {
            Value::Number(n) if !n.is_f64() => n.as_i64(),
            _ => None,
        }
    }

    pub fn int(&self, name: &str, default: i64) -> Result<i64, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => Self::int_value(v).ok_or_else(|| expected("int", v, name)),
        }
    }

    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.present(name) {
            None => Ok(None),
            Some(v) => Self::int_value(v)
                .map(Some)
                .ok_or_else(|| expected("int | null", v, name)),
        }
    }

    /// `int | None = default`: absent -> default, null -> None.
    pub fn opt_int_default(
        &self,
        name: &str,
        default: Option<i64>,
    ) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => Self::int_value(v)
                .map(Some)
                .ok_or_else(|| expected("int | null", v, name)),
        }
    }

    pub fn opt_float(&self, name: &str) -> Result<Option<f64>, ApiError> {
        match self.present(name) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(v) => Err(expected("float | null", v, name)),
        }
    }

    pub fn bool(&self, name: &str, default: bool) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(expected("bool", v, name)),
        }
    }

    pub fn opt_str(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.present(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(expected("str | null", v, name)),
        }
    }

    fn opt_int_list(&self, name: &str) -> Result<Option<Vec<i64>>, ApiError> {
        match self.present(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    Self::int_value(v).ok_or_else(|| expected("int", v, &format!("{name}[{i}]")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(expected("array | null", v, name)),
        }
    }

    fn stop(&self) -> Result<Vec<String>, ApiError> {
        match self.present("stop") {
            None => Ok(vec![]),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(expected("str", v, &format!("stop[{i}]"))),
                })
                .collect(),
            Some(v) => Err(expected("str | array | null", v, "stop")),
        }
    }

    /// Whether a field is set to something other than its "off" value (null, false, 0-length).
    fn is_set(&self, name: &str) -> bool {
        match self.get(name) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            // An empty allow-list is an error in Python ("must not be empty"), not "off".
            Some(Value::Array(a)) => !a.is_empty() || name == "allowed_token_ids",
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        }
    }
}

/// The fields completions and chat share, decoded (`_SamplingFields`).
#[derive(Debug, Clone)]
pub struct Common {
    pub model: Option<String>,
    pub n: i64,
    pub stream: bool,
    pub include_usage: bool,
    has_stream_options: bool,
    best_of: Option<i64>,
    /// Everything but `max_tokens` and `logprobs`, which each route resolves.
    pub params: SamplingParams,
}

fn common(f: &Fields, unsupported_extra: &[&str]) -> Result<Common, ApiError> {
    let model = f.opt_str("model")?.map(str::to_string);
    let n = f.int("n", 1)?;
    let temperature = f.opt_float("temperature")?;
    let top_p = f.opt_float("top_p")?;
    let stop = f.stop()?;
    let seed = f.opt_int("seed")?;
    let stream = f.bool("stream", false)?;
    let (has_stream_options, include_usage) = match f.present("stream_options") {
        None => (false, false),
        Some(Value::Object(o)) => {
            let include = match o.get("include_usage") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(expected("bool", v, "stream_options.include_usage")),
            };
            if let Some(v) = o.get("continuous_usage_stats").filter(|v| !v.is_boolean()) {
                return Err(expected("bool", v, "stream_options.continuous_usage_stats"));
            }
            (true, include)
        }
        Some(v) => return Err(expected("object | null", v, "stream_options")),
    };
    f.opt_str("user")?;
    let presence_penalty = f.opt_float("presence_penalty")?;
    let frequency_penalty = f.opt_float("frequency_penalty")?;
    let best_of = f.opt_int("best_of")?;
    let top_k = f.opt_int("top_k")?;
    let min_p = f.opt_float("min_p")?;
    let repetition_penalty = f.opt_float("repetition_penalty")?;
    let ignore_eos = f.bool("ignore_eos", false)?;
    let min_tokens = f.int("min_tokens", 0)?;
    let stop_token_ids = f.opt_int_list("stop_token_ids")?.unwrap_or_default();
    let skip_special_tokens = f.bool("skip_special_tokens", true)?;
    let include_stop_str_in_output = f.bool("include_stop_str_in_output", false)?;
    f.bool("spaces_between_special_tokens", true)?;
    for &field in UNSUPPORTED_COMMON.iter().chain(unsupported_extra) {
        if f.is_set(field) {
            return Err(unsupported(field));
        }
    }
    let params = SamplingParams {
        n,
        temperature: temperature.unwrap_or(1.0),
        top_p: top_p.unwrap_or(1.0),
        top_k: top_k.unwrap_or(0),
        min_p: min_p.unwrap_or(0.0),
        seed,
        max_tokens: None,
        min_tokens,
        stop,
        stop_token_ids,
        ignore_eos,
        logprobs: None,
        skip_special_tokens,
        include_stop_str_in_output,
        presence_penalty: presence_penalty.unwrap_or(0.0),
        frequency_penalty: frequency_penalty.unwrap_or(0.0),
        repetition_penalty: repetition_penalty.unwrap_or(1.0),
        ..SamplingParams::default()
    };
    Ok(Common {
        model,
        n,
        stream,
        include_usage: include_usage && stream,
        has_stream_options,
        best_of,
        params,
    })
}

impl Common {
    /// `_sampling_params` + `SamplingParams.__post_init__`: the checks in the Python order.
    fn finish(
        &self,
        max_tokens: Option<i64>,
        logprobs: Option<i64>,
    ) -> Result<SamplingParams, ApiError> {
        if self.n > MAX_N {
            return Err(ApiError::invalid(format!(
                "n: must be at most {MAX_N}, got {}",
                self.n
            )));
        }
        if self.has_stream_options && !self.stream {
            return Err(ApiError::invalid(
                "stream_options: only allowed when stream is true",
            ));
        }
        if let Some(best_of) = self.best_of {
            if best_of != self.n {
                return Err(unsupported("best_of"));
            }
        }
        let mut p = self.params.clone();
        p.max_tokens = max_tokens;
        p.logprobs = logprobs;
        if p.top_k == -1 {
            p.top_k = 0;
        }
        check(p.n >= 1, "n", "must be at least 1")?;
        check(p.temperature >= 0.0, "temperature", "must be non-negative")?;
        check(
            0.0 < p.top_p && p.top_p <= 1.0,
            "top_p",
            "must be in (0, 1]",
        )?;
        check(p.top_k >= 0, "top_k", "must be -1 (disabled) or positive")?;
        check((0.0..=1.0).contains(&p.min_p), "min_p", "must be in [0, 1]")?;
        if let Some(m) = p.max_tokens {
            check(m >= 0, "max_tokens", "must be non-negative")?;
        }
        check(p.min_tokens >= 0, "min_tokens", "must be non-negative")?;
        if let Some(m) = p.max_tokens {
            check(
                p.min_tokens <= m,
                "min_tokens",
                "must not exceed max_tokens",
            )?;
        }
        check(
            p.stop.iter().all(|s| !s.is_empty()),
            "stop",
            "must be non-empty strings",
        )?;
        if let Some(l) = p.logprobs {
            check((0..=20).contains(&l), "logprobs", "must be in [0, 20]")?;
        }
        for (name, v) in [
            ("presence_penalty", p.presence_penalty),
            ("frequency_penalty", p.frequency_penalty),
        ] {
            check((-2.0..=2.0).contains(&v), name, "must be in [-2, 2]")?;
        }
        check(
            p.repetition_penalty > 0.0,
            "repetition_penalty",
            "must be positive",
        )?;
        Ok(p)
    }
}

fn check(cond: bool, name: &str, msg: &str) -> Result<(), ApiError> {
    if cond {
        Ok(())
    } else {
        Err(ApiError::bad(name, format!("{name}: {msg}")))
    }
}

/// One prompt of a completions request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<i64>),
}

#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub common: Common,
    prompt: Value,
    max_tokens: Option<i64>,
    pub logprobs: Option<i64>,
    pub add_special_tokens: bool,
}

impl CompletionRequest {
    pub fn parse(body: &[u8]) -> Result<CompletionRequest, ApiError> {
        let map = parse_object(body)?;
        let f = Fields(&map);
        let prompt = match f.get("prompt") {
            None | Some(Value::Null) => Value::Null,
            Some(v @ (Value::String(_) | Value::Array(_))) => v.clone(),
            Some(v) => return Err(expected("str | array | null", v, "prompt")),
        };
        let max_tokens = f.opt_int_default("max_tokens", Some(16))?;
        let logprobs = f.opt_int("logprobs")?;
        let add_special_tokens = f.bool("add_special_tokens", true)?;
        let common = common(&f, UNSUPPORTED_COMPLETION)?;
        Ok(CompletionRequest {
            common,
            prompt,
            max_tokens,
            logprobs,
            add_special_tokens,
        })
    }

    /// `to_sampling_params` (max_tokens stays as asked: None = the room the prompt leaves).
    pub fn sampling_params(&self) -> Result<SamplingParams, ApiError> {
        if self.max_tokens == Some(0) {
            return Err(ApiError::invalid(
                "max_tokens: must be at least 1 (0 only with echo or prompt_logprobs)",
            ));
        }
        self.common.finish(self.max_tokens, self.logprobs)
    }

    /// `prompts()`: a string, a list of strings, a list of ids or a list of id lists.
    pub fn prompts(&self) -> Result<Vec<Prompt>, ApiError> {
        let items = match &self.prompt {
            Value::Null => return Err(ApiError::invalid("prompt: required (or prompt_embeds)")),
            Value::String(s) => return Ok(vec![Prompt::Text(s.clone())]),
            Value::Array(items) => items,
            _ => unreachable!("checked in parse"),
        };
        if items.is_empty() {
            return Err(ApiError::invalid("prompt: must not be empty"));
        }
        let is_id = |v: &Value| matches!(v, Value::Number(n) if !n.is_f64());
        let all_ids = items.iter().all(is_id);
        if (items.len() as i64).saturating_mul(self.common.n) > MAX_SEQUENCES_PER_REQUEST
            && !all_ids
        {
            return Err(ApiError::invalid(format!(
                "prompt: {} prompts x n={} exceeds {MAX_SEQUENCES_PER_REQUEST} sequences per request",
                items.len(),
                self.common.n
            )));
        }
        let ids_of = |v: &[Value]| {
            v.iter()
                .map(|t| t.as_i64().unwrap_or(-1))
                .collect::<Vec<_>>()
        };
        if all_ids {
            return Ok(vec![Prompt::Ids(ids_of(items))]);
        }
        if items.iter().all(Value::is_string) {
            return Ok(items
                .iter()
                .map(|v| Prompt::Text(v.as_str().unwrap_or_default().to_string()))
                .collect());
        }
        if items
            .iter()
            .all(|x| matches!(x, Value::Array(a) if !a.is_empty() && a.iter().all(is_id)))
        {
            return Ok(items
                .iter()
                .map(|x| Prompt::Ids(ids_of(x.as_array().map(Vec::as_slice).unwrap_or(&[]))))
                .collect());
        }
        Err(ApiError::invalid(
            "prompt: must be a string, a list of strings, a list of token ids or a list of token-id lists",
        ))
    }
}

/// Names the chat route gives the renderer itself (protocol.py `RESERVED_CHAT_TEMPLATE_KWARGS`).
const RESERVED_CHAT_TEMPLATE_KWARGS: &[&str] = &[
    "add_generation_prompt",
    "chat_template",
    "messages",
    "special_tokens",
    "template",
];

#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub common: Common,
    pub messages: Value,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub add_generation_prompt: bool,
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Map<String, Value>,
    pub add_special_tokens: bool,
}

impl ChatRequest {
    pub fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
        let map = parse_object(body)?;
        let f = Fields(&map);
        let messages = match f.get("messages") {
            None => {
                return Err(ApiError::invalid(
                    "Object missing required field `messages`",
                ))
            }
            Some(v @ Value::Array(_)) => v.clone(),
            Some(v) => return Err(expected("array", v, "messages")),
        };
        let max_tokens = f.opt_int("max_tokens")?;
        let max_completion_tokens = f.opt_int("max_completion_tokens")?;
        let logprobs = f.bool("logprobs", false)?;
        let top_logprobs = f.opt_int("top_logprobs")?;
        f.bool("parallel_tool_calls", false)
            .or_else(|e| match f.get("parallel_tool_calls") {
                Some(Value::Null) => Ok(false),
                _ => Err(e),
            })?;
        let add_generation_prompt = f.bool("add_generation_prompt", true)?;
        let chat_template = f.opt_str("chat_template")?.map(str::to_string);
        let chat_template_kwargs = match f.present("chat_template_kwargs") {
            None => Map::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(v) => return Err(expected("object | null", v, "chat_template_kwargs")),
        };
        let add_special_tokens = f.bool("add_special_tokens", false)?;
        let common = common(&f, UNSUPPORTED_CHAT)?;
        // Without tools (refused above when set), tool_choice may only be absent or "none"
        // (shoal/structured/tool_choice.py `plan_tools`).
        match f.get("tool_choice") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "none" => {}
            Some(_) => return Err(ApiError::invalid("tool_choice: requires tools")),
        }
        Ok(ChatRequest {
            common,
            messages,
            max_tokens,
            max_completion_tokens,
            logprobs,
            top_logprobs,
            add_generation_prompt,
            chat_template,
            chat_template_kwargs,
            add_special_tokens,
        })
    }

    pub fn sampling_params(&self) -> Result<SamplingParams, ApiError> {
        if self.top_logprobs.is_some() && !self.logprobs {
            return Err(ApiError::invalid(
                "top_logprobs: requires logprobs to be true",
            ));
        }
        if let Some(t) = self.top_logprobs {
            if !(0..=20).contains(&t) {
                return Err(ApiError::invalid("top_logprobs: must be in [0, 20]"));
            }
        }
        let mut clashing: Vec<&str> = RESERVED_CHAT_TEMPLATE_KWARGS
            .iter()
            .copied()
            .filter(|k| self.chat_template_kwargs.contains_key(*k))
            .collect();
        clashing.sort_unstable();
        if !clashing.is_empty() {
            let list = clashing
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ApiError::invalid(format!(
                "chat_template_kwargs: [{list}] are set by the server, not the request"
            )));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if let Some(m) = max_tokens {
            if m < 1 {
                let field = if self.max_completion_tokens.is_some() {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                return Err(ApiError::invalid(format!("{field}: must be at least 1")));
            }
        }
        let logprobs = if self.logprobs {
            Some(self.top_logprobs.unwrap_or(0))
        } else {
            None
        };
        self.common.finish(max_tokens, logprobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<impl std::fmt::Debug, ApiError>) -> ApiError {
        r.expect_err("expected an error")
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = err(CompletionRequest::parse(
            br#"{"prompt":"x","max_tokens":"a"}"#,
        ));
        assert_eq!(
            e.message,
            "Expected `int | null`, got `str` - at `$.max_tokens`"
        );
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = err(CompletionRequest::parse(br#"{"prompt":"x","n":1.5}"#));
        assert_eq!(e.message, "Expected `int`, got `float` - at `$.n`");
        let e = err(ChatRequest::parse(br#"{"model":"m"}"#));
        assert_eq!(e.message, "Object missing required field `messages`");
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = err(CompletionRequest::parse(br#"{"prompt":"x","stop":[1]}"#));
        assert_eq!(e.param.as_deref(), Some("stop[0]"));
        let e = err(CompletionRequest::parse(b"{nope"));
        assert!(
            e.message.starts_with("the request body is not valid JSON"),
            "{}",
            e.message
        );
        assert_eq!(
            err(CompletionRequest::parse(b"[1]")).message,
            "Expected `object`, got `array`"
        );
    }

    #[test]
    fn unsupported_features_are_named() {
        let e = err(ChatRequest::parse(
            br#"{"messages":[],"tool_choice":"auto"}"#,
        ));
        assert_eq!(e.message, "tool_choice: requires tools");
        assert!(ChatRequest::parse(br#"{"messages":[],"tool_choice":"none","tools":[]}"#).is_ok());
        let e = err(ChatRequest::parse(
            br#"{"messages":[],"tools":[{"type":"function"}]}"#,
        ));
        assert_eq!(e.status, 400);
        assert_eq!(e.param.as_deref(), Some("tools"));
        assert_eq!(e.message, "tools is not supported by the native frontend (--frontend rust); use --frontend python");
        let e = err(CompletionRequest::parse(
            br#"{"prompt":"x","logit_bias":{"1":2}}"#,
        ));
        assert_eq!(e.param.as_deref(), Some("logit_bias"));
        let e = err(CompletionRequest::parse(br#"{"prompt":"x","echo":true}"#));
        assert_eq!(e.param.as_deref(), Some("echo"));
        let e = err(CompletionRequest::parse(
            br#"{"prompt":"x","allowed_token_ids":[]}"#,
        ));
        assert_eq!(e.param.as_deref(), Some("allowed_token_ids"));
        // Off values are fine.
        assert!(CompletionRequest::parse(
            br#"{"prompt":"x","echo":false,"logit_bias":null,"bad_words":[]}"#
        )
        .is_ok());
    }

    #[test]
    fn sampling_params_checked_like_python() {
        let r = CompletionRequest::parse(br#"{"prompt":"x","top_p":0}"#).unwrap();
        let e = err(r.sampling_params());
        assert_eq!(
            (e.message.as_str(), e.param.as_deref()),
            ("top_p: must be in (0, 1]", Some("top_p"))
        );
        let r =
            CompletionRequest::parse(br#"{"prompt":"x","stream_options":{"include_usage":true}}"#)
                .unwrap();
        assert_eq!(
            err(r.sampling_params()).message,
            "stream_options: only allowed when stream is true"
        );
        let r = CompletionRequest::parse(br#"{"prompt":"x","n":129}"#).unwrap();
        assert_eq!(
            err(r.sampling_params()).message,
            "n: must be at most 128, got 129"
        );
        let r = CompletionRequest::parse(
            br#"{"prompt":"x","stop":"\n","seed":3,"top_k":-1,"logprobs":2}"#,
        )
        .unwrap();
        let p = r.sampling_params().unwrap();
        assert_eq!(
            (p.stop, p.seed, p.top_k, p.logprobs, p.max_tokens),
            (vec!["\n".to_string()], Some(3), 0, Some(2), Some(16))
        );
        let r = ChatRequest::parse(br#"{"messages":[],"max_completion_tokens":0}"#).unwrap();
        assert_eq!(
            err(r.sampling_params()).param.as_deref(),
            Some("max_completion_tokens")
        );
        let r = ChatRequest::parse(br#"{"messages":[],"top_logprobs":2}"#).unwrap();
        assert_eq!(
            err(r.sampling_params()).message,
            "top_logprobs: requires logprobs to be true"
        );
        let r = ChatRequest::parse(br#"{"messages":[],"logprobs":true,"top_logprobs":3}"#).unwrap();
        let p = r.sampling_params().unwrap();
        assert_eq!((p.logprobs, p.max_tokens), (Some(3), None));
    }

    #[test]
    fn prompts_shapes() {
        let p = |b: &[u8]| CompletionRequest::parse(b).unwrap().prompts();
        assert_eq!(
            p(br#"{"prompt":"hi"}"#).unwrap(),
            vec![Prompt::Text("hi".into())]
        );
        assert_eq!(
            p(br#"{"prompt":[1,2]}"#).unwrap(),
            vec![Prompt::Ids(vec![1, 2])]
        );
        assert_eq!(
            p(br#"{"prompt":[[1],[2,3]]}"#).unwrap(),
            vec![Prompt::Ids(vec![1]), Prompt::Ids(vec![2, 3])]
        );
        assert_eq!(p(br#"{"prompt":["a","b"]}"#).unwrap().len(), 2);
        assert_eq!(
            err(p(br#"{"prompt":[]}"#)).message,
            "prompt: must not be empty"
        );
        assert_eq!(
            err(p(br#"{"prompt":["a",1]}"#)).param.as_deref(),
            Some("prompt")
        );
        assert_eq!(
            err(p(br#"{}"#)).message,
            "prompt: required (or prompt_embeds)"
        );
    }
}
